"""Super-network building blocks: a choice layer of m candidate operators, and a base class
whose ``forward(x, path)`` routes through one candidate per choice layer.

A *path* is a long tensor of operator indices, one per choice layer, in the order the layers were
registered: shape (L,) for one path shared by the whole batch (the paper's setting) or (B, L) for
one path per example (each example routed through its own sub-network in one call).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sors import kernels


class ChoiceLayer(nn.Module):
    """m parallel candidate operators; exactly one runs per example.

    The owning :class:`SuperNet` sets ``active`` (an int, or a (B,) long tensor) before each forward.
    """

    def __init__(self, candidates: list[nn.Module]):
        super().__init__()
        if not candidates:
            raise ValueError("a choice layer needs at least one candidate")
        self.candidates = nn.ModuleList(candidates)
        self.active: int | torch.Tensor | None = None

    @property
    def num_choices(self) -> int:
        return len(self.candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.active
        if index is None:
            raise RuntimeError("ChoiceLayer called outside SuperNet.forward: no active candidate")
        if isinstance(index, int):
            return self.candidates[index](x)
        if isinstance(index, tuple):
            return self._route_blocks(x, index)
        return self._route_per_example(x, index)

    def _route_blocks(self, x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
        """``x`` is len(blocks) equal contiguous blocks along the batch, block i through candidate
        blocks[i]: runs of equal candidates go through in one call, on views (no sort, no gather)."""
        runs: list[list[int]] = []  # [candidate, number of blocks]
        for candidate in blocks:
            if runs and runs[-1][0] == candidate:
                runs[-1][1] += 1
            else:
                runs.append([candidate, 1])
        if len(runs) == 1:
            return self.candidates[runs[0][0]](x)
        size = x.shape[0] // len(blocks)
        chunks = torch.split(x, [n * size for _, n in runs])
        return torch.cat([self.candidates[c](chunk) for (c, _), chunk in zip(runs, chunks)])

    def _route_per_example(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Send each example through its own candidate: sort by candidate, run each group, unsort."""
        counts = torch.bincount(index, minlength=self.num_choices).tolist()
        used = [k for k, c in enumerate(counts) if c]
        if len(used) == 1:
            return self.candidates[used[0]](x)
        order = torch.argsort(index, stable=True)
        groups = torch.split(x[order], [counts[k] for k in used])
        out = torch.cat([self.candidates[k](g) for k, g in zip(used, groups)])
        return out[torch.argsort(order)]


class SuperNet(nn.Module):
    """Base class: subclasses build ``self.body`` (any module containing :class:`ChoiceLayer` s)
    and call :meth:`_register_choices` at the end of ``__init__``.

    ``forward(x, path=None)``: x is (B, C, H, W) pixels in [0, 1]; returns logits (B, classes).
    With ``path=None`` a path is sampled uniformly, in training *and* eval mode (the randomness is
    the defense); ``per_example=True`` then samples one path per example.
    """

    per_example: bool = False

    def _register_choices(self) -> None:
        # Plain list, not ModuleList: the layers are already registered inside the body.
        self._choices = [m for m in self.body.modules() if isinstance(m, ChoiceLayer)]
        self.generator: torch.Generator | None = None

    @property
    def choice_layers(self) -> list[ChoiceLayer]:
        return self._choices

    @property
    def choice_counts(self) -> list[int]:
        """m for each choice layer, in path order."""
        return [layer.num_choices for layer in self._choices]

    @property
    def num_paths(self) -> int:
        """Number of distinct sub-networks: the product of the m's."""
        return math.prod(self.choice_counts)

    def sample_path(self, generator: torch.Generator | None = None, batch_size: int | None = None) -> torch.Tensor:
        """A uniformly random path: (L,) long, or (batch_size, L) when ``batch_size`` is given."""
        generator = generator if generator is not None else self.generator
        rows = 1 if batch_size is None else batch_size
        columns = [torch.randint(0, m, (rows,), generator=generator) for m in self.choice_counts]
        path = torch.stack(columns, dim=1)
        return path[0] if batch_size is None else path

    def check_path(self, path: torch.Tensor | list | tuple, batch_size: int) -> torch.Tensor:
        """Validate a path for a batch of ``batch_size``; returns it as a long tensor."""
        path = torch.as_tensor(path, dtype=torch.long)
        counts = torch.tensor(self.choice_counts, device=path.device)  # a path may live on the GPU (FixedPath buffer)
        if path.shape[-1] != len(counts) or path.dim() not in (1, 2):
            raise ValueError(f"path must have shape ({len(counts)},) or (B, {len(counts)}), got {tuple(path.shape)}")
        if path.dim() == 2 and path.shape[0] != batch_size:
            raise ValueError(f"per-example path has {path.shape[0]} rows for a batch of {batch_size}")
        if (path < 0).any() or (path >= counts).any():
            raise ValueError(f"path {path.tolist()} has an index outside the candidate counts {counts.tolist()}")
        return path

    def forward(self, x: torch.Tensor, path: torch.Tensor | None = None) -> torch.Tensor:
        if path is None:
            path = self.sample_path(batch_size=x.shape[0] if self.per_example else None)
        else:
            path = self.check_path(path, x.shape[0])
        # one path for the batch is only read as Python ints: keep it off the GPU (no copy, no sync)
        self._activate(path.to(x.device) if path.dim() == 2 else path)
        return self.body(x)

    def forward_blocks(self, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """K paths over K stacked copies of a batch in one call: x is (K*B, C, H, W), block k
        (rows k*B:(k+1)*B) goes through ``paths[k]``; paths is (K, L). Same result as
        ``forward(x, paths.repeat_interleave(B, 0))``, without the per-example sort (SORS training)."""
        paths = torch.as_tensor(paths, dtype=torch.long)
        if paths.dim() != 2 or x.shape[0] % paths.shape[0]:
            raise ValueError(
                f"forward_blocks needs paths (K, L) and a batch divisible by K, got "
                f"{tuple(paths.shape)} for {x.shape[0]} rows"
            )
        self.check_path(paths, paths.shape[0])
        for layer, column in zip(self._choices, paths.t().tolist()):
            layer.active = tuple(column)
        return self.body(x)

    def forward_copies(self, x: torch.Tensor, copies: int, path: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(x.repeat(copies, 1, 1, 1), path)`` (rows copy-major, the same path draw), without
        computing any row twice: every top-level layer of the body runs once per *distinct* row,
        i.e. per distinct (image, choices made so far). Before the first choice layer that is the B
        images; after it at most m*B rows; the count grows to copies*B only as deeper choices
        separate the copies. Gradients of the final expansion sum over the copies.

        Why: EOT over E path draws repeats each image E times; with E = 20 and m = 4 candidates the
        first layers (most of LeNet-5's cost; a ResNet's stem and first block) shrink 2-5x. It also
        replaces the sort/unsort of per-example routing by one gather per choice layer.
        """
        batch, rows = x.shape[0], copies * x.shape[0]
        if path is None:
            path = self.sample_path(batch_size=rows if self.per_example else None)
        else:
            path = self.check_path(path, rows)
        path = path.to(x.device)
        if path.dim() == 1 or not isinstance(self.body, nn.Sequential):
            return self.forward(x.repeat(copies, *([1] * (x.dim() - 1))), path)
        columns = iter(path.unbind(1))  # self._choices order = body.modules() order
        h, index = x, torch.arange(rows, device=x.device) % batch  # index: copy row -> row of h
        for module in self.body:
            inner = [m for m in module.modules() if isinstance(m, ChoiceLayer)]
            if inner:
                h, index = _route_distinct(module, inner, [next(columns) for _ in inner], h, index)
            else:
                h = module(h)
        return h.index_select(0, index)

    def _activate(self, path: torch.Tensor) -> None:
        if path.dim() == 1:
            for layer, index in zip(self._choices, path.tolist()):
                layer.active = index
        else:
            for layer, column in zip(self._choices, path.unbind(1)):
                layer.active = column

    @torch.no_grad()
    def init_perturbed_copies_(self, noise: float = 0.5, generator: torch.Generator | None = None) -> "SuperNet":
        """Make every candidate of a choice layer a copy of its first candidate plus Gaussian noise
        (std = ``noise`` x the std of each weight tensor). Only for layers whose candidates share a shape.

        Why: with independent initialisation every sub-network starts from features its neighbours
        have never seen, and a super-network sits on a long plateau (hundreds of steps on LeNet-5);
        perturbed copies start all paths near one network, and the orthogonality loss and the
        independent updates of each candidate pull them apart.
        """
        for layer in self._choices:
            first = layer.candidates[0].state_dict()
            for candidate in layer.candidates[1:]:
                shapes_match = all(v.shape == first[k].shape for k, v in candidate.state_dict().items())
                if not shapes_match:
                    continue
                for name, tensor in candidate.state_dict().items():
                    source = first[name]
                    if not source.is_floating_point():
                        continue
                    scale = source.std() if source.numel() > 1 else source.abs()
                    tensor.copy_(source + noise * scale * torch.randn(source.shape, generator=generator))
        return self

    def extract_subnet(self, path) -> nn.Module:
        """A plain ``nn.Module`` (no choice layers) equal to this super-network on ``path`` (L,)."""
        path = self.check_path(path, 1)
        if path.dim() != 1:
            raise ValueError("extract_subnet takes one path of shape (L,)")
        chosen = {id(layer): layer.candidates[i] for layer, i in zip(self._choices, path.tolist())}
        return _replace_choices(self.body, chosen)


def _route_distinct(
    module: nn.Module, inner: list[ChoiceLayer], columns: list[torch.Tensor], h: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``module`` once per distinct (row of h, choices of its choice layers) among the copy rows.

    ``index`` maps each copy row to its row of ``h``; ``columns`` are the copy rows' candidates for
    ``inner`` (the choice layers inside ``module``). Returns the distinct outputs and the new map.
    """
    n = h.shape[0]
    if isinstance(module, ChoiceLayer) and len(inner) == 1:
        # candidate-major key: the distinct rows come out grouped by candidate, no unsort needed
        distinct, inverse = torch.unique(columns[0] * n + index, return_inverse=True)
        counts = torch.bincount(distinct // n, minlength=module.num_choices).tolist()
        used = [k for k, c in enumerate(counts) if c]
        groups = torch.split(h.index_select(0, distinct % n), [counts[k] for k in used])
        outs = [module.candidates[k](g) for k, g in zip(used, groups)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), inverse
    key = index
    for layer, column in zip(inner, columns):
        key = key * layer.num_choices + column
    distinct, inverse = torch.unique(key, return_inverse=True)
    rest = distinct
    for layer in reversed(inner):  # decode (row, c_1, ..., c_k) from the mixed-radix key
        layer.active = rest % layer.num_choices
        rest = rest // layer.num_choices
    return module(h.index_select(0, rest)), inverse


def repeat_forward(model: nn.Module, x: torch.Tensor, copies: int) -> torch.Tensor:
    """``model(x.repeat(copies, 1, 1, 1))``: for a :class:`SuperNet` the same values via
    :meth:`SuperNet.forward_copies` (shared layers once per distinct image); other models as is."""
    if isinstance(model, SuperNet) and copies > 1:
        return model.forward_copies(x, copies)
    return model(x.repeat(copies, *([1] * (x.dim() - 1))))


def _replace_choices(module: nn.Module, chosen: dict[int, nn.Module]) -> nn.Module:
    if id(module) in chosen:
        return copy.deepcopy(chosen[id(module)])
    clone = copy.copy(module)
    clone._modules = {
        name: _replace_choices(child, chosen) if child is not None else None for name, child in module._modules.items()
    }
    clone._parameters = {
        k: (nn.Parameter(v.detach().clone(), v.requires_grad) if v is not None else None)
        for k, v in module._parameters.items()
    }
    clone._buffers = {k: (v.clone() if v is not None else None) for k, v in module._buffers.items()}
    return clone


def is_super_network(model: nn.Module) -> bool:
    """True when ``model`` samples paths (a :class:`SuperNet` or a wrapper around one)."""
    return isinstance(model, SuperNet) or isinstance(getattr(model, "supernet", None), SuperNet)


def freeze_path(model: nn.Module, path) -> nn.Module:
    """A deterministic view of a super-network: ``forward(x)`` always uses ``path``."""
    return FixedPath(model, path)


class FixedPath(nn.Module):
    """Wraps a :class:`SuperNet` so every forward uses one fixed path (deterministic model)."""

    def __init__(self, supernet: SuperNet, path):
        super().__init__()
        self.net = supernet  # not named `supernet`: a fixed path is deterministic
        # a plain attribute, not a buffer: it stays on the host when the model moves to a GPU, so
        # checking it and reading its ints each forward costs no device copy and no sync
        path = torch.as_tensor(path, dtype=torch.long).cpu()
        self.path = supernet.check_path(path, path.shape[0] if path.dim() == 2 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.path)


class per_example_sampling:
    """Context manager: every :class:`SuperNet` inside ``model`` samples one path per example
    (used by EOT: E copies of a batch in one forward draw E independent paths)."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.nets = [m for m in model.modules() if isinstance(m, SuperNet)]
        self.enabled = enabled
        self.saved: list[bool] = []

    def __enter__(self):
        self.saved = [net.per_example for net in self.nets]
        for net in self.nets:
            net.per_example = self.enabled
        return self

    def __exit__(self, *exc):
        for net, value in zip(self.nets, self.saved):
            net.per_example = value
        return False


def enumerable(model: nn.Module, limit: int) -> bool:
    """True when ``model`` is itself a :class:`SuperNet` (not a wrapper that averages or adds noise)
    with at most ``limit`` paths, so an expectation over its random path is an exact finite sum."""
    return isinstance(model, SuperNet) and 0 < model.num_paths <= limit


def every_path(net: SuperNet) -> torch.Tensor:
    """All ``net.num_paths`` paths, (P, L) long, in lexicographic order of the choice indices."""
    grids = torch.meshgrid(*[torch.arange(m) for m in net.choice_counts], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def every_path_logits(net: SuperNet, x: torch.Tensor, paths: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``x`` (B, C, H, W) under every path (or the given ``paths`` (P, L)), (P, B, K), in
    one call, each layer computed once per distinct (image, choices so far) -- a tree, about 30x one
    forward for SORS-LeNet-5's 1,024 paths. Differentiable in ``x``. Every path of a body whose
    choice layers all sit at its top level runs through :func:`_every_path_tree`; otherwise the
    paths run as copies of the batch through :meth:`SuperNet.forward_copies`."""
    if paths is None and _tree_ready(net):
        return _every_path_tree(net, x)
    paths = every_path(net) if paths is None else paths
    rows = paths.repeat_interleave(x.shape[0], dim=0)  # copy-major: row p*B + b takes path p
    return net.forward_copies(x, paths.shape[0], rows).view(paths.shape[0], x.shape[0], -1)


def _tree_ready(net: SuperNet) -> bool:
    """True when every choice layer of ``net`` is a top-level module of a sequential body."""
    if not isinstance(net.body, nn.Sequential):
        return False
    top = sum(isinstance(module, ChoiceLayer) for module in net.body)
    return top == len(net._choices)


def _every_path_tree(net: SuperNet, x: torch.Tensor) -> torch.Tensor:
    """Every path of ``net`` (see :func:`_tree_ready`) on ``x`` (B, ...): (P, B, K), paths in the
    order of :func:`every_path`. Rows stay image-major with the latest choice fastest, so each
    choice layer maps (R, ...) to (R*m, ...) by running all its candidates on all R rows.

    Why not :meth:`SuperNet.forward_copies`: that routes P*B copy rows through ``torch.unique`` and
    gathers at every layer and scatters them back in the backward; enumerating every path needs no
    routing at all, and stacking equal-shape Linear / Conv candidates into one wider layer runs
    each layer as one call (2-3x faster per attack step on SORS-LeNet-5)."""
    h, modules = x, list(net.body)
    for i, module in enumerate(modules):
        if _pools_next(modules, i):  # ReLU then max-pool: pool first, same values, a quarter of the ReLU rows
            modules[i], modules[i + 1] = modules[i + 1], module
            module = modules[i]
        h = _all_candidates(module, h) if isinstance(module, ChoiceLayer) else module(h)
    return h.view(x.shape[0], net.num_paths, -1).transpose(0, 1)


def _pools_next(modules: list[nn.Module], i: int) -> bool:
    """True when ``modules[i]`` is a ReLU followed by a max-pool: max(relu(a)) = relu(max(a)) (ReLU is
    monotone), gradients included (both send the gradient to the window's maximum, zero where it is <= 0)."""
    return type(modules[i]) is nn.ReLU and i + 1 < len(modules) and type(modules[i + 1]) is nn.MaxPool2d


def _all_candidates(layer: ChoiceLayer, h: torch.Tensor) -> torch.Tensor:
    """Every candidate of ``layer`` on every row of ``h`` (R, ...): (R*m, ...), row r*m + k = candidate k."""
    candidates, rows = list(layer.candidates), h.shape[0] * layer.num_choices
    first = candidates[0]
    if _stackable(candidates):
        weight = torch.cat([c.weight for c in candidates])
        bias = torch.cat([c.bias for c in candidates]) if first.bias is not None else None
        if type(first) is nn.Linear:
            return F.linear(h, weight, bias).view(rows, -1)
        out = kernels.conv2d(h, weight, bias, first.stride, first.padding, first.dilation, first.groups)
        return out.view(rows, first.out_channels, *out.shape[2:])
    return torch.stack([c(h) for c in candidates], dim=1).flatten(0, 1)


def _stackable(candidates: list[nn.Module]) -> bool:
    """True when ``candidates`` are all ``nn.Linear`` or all zero-padded ``nn.Conv2d`` that differ
    only in their weights: one layer with their weights concatenated computes all of them."""
    first = candidates[0]
    if type(first) is nn.Linear:
        settings = lambda c: (type(c), c.weight.shape, c.bias is None)  # noqa: E731
    elif isinstance(first, nn.Conv2d) and first.padding_mode == "zeros":
        settings = lambda c: (
            type(c),
            c.weight.shape,
            c.bias is None,
            c.stride,
            c.padding,
            c.dilation,  # noqa: E731
            c.groups,
            c.padding_mode,
        )
    else:
        return False
    return all(settings(c) == settings(first) for c in candidates)


@contextlib.contextmanager
def seeded_draws(models: Sequence[nn.Module | None], seed: int, net_seed: Callable[[int], int]):
    """Make every random draw inside a fixed function of the seeds: torch's global generator (noise
    layers, random starts) gets ``seed``, the path generator of the i-th :class:`SuperNet` found in
    ``models`` gets ``net_seed(i)``. Generators and RNG state are restored on exit."""
    nets = [m for model in models if model is not None for m in model.modules() if isinstance(m, SuperNet)]
    saved = [net.generator for net in nets]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % 2**63)
        for i, net in enumerate(nets):
            net.generator = torch.Generator().manual_seed(net_seed(i))
        try:
            yield
        finally:
            for net, generator in zip(nets, saved):
                net.generator = generator
