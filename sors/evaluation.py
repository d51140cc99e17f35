"""The evaluation protocol for one cell (model, split, attack, eps, seed), honest for randomized models.

Protocol (:func:`evaluate_cell`):

1. The attack runs on the first ``eval.n_examples`` images, in batches, under its own path draws.
2. Scoring uses *independent* draws, as in deployment: every example gets its own path (one per
   example), repeated ``eval.repeats`` times (5) with fresh draws for randomized models (once for
   deterministic ones). Per-example correctness is averaged over the repeats; the cell's accuracy
   is their mean, with a 95% Wilson interval on n examples (conservative for a mean of repeats).
3. For randomized models, the worst-case view: the fraction of examples classified correctly
   under EVERY one of ``eval.all_paths`` (64) draws (each draw is one path for all examples).
4. Per-cell sanity checks (:mod:`sors.checks`) are recorded in ``sanity_flags``.
5. Per-example outcomes are kept: each example's index in its split, its correctness averaged over
   the scoring draws and its minimum over them, so worst cases over attacks and paired tests
   between cells need no rerun.

Seeds: the attack, each scoring repeat, each worst-case draw and the gradient check get their own
seed derived from the cell's ``seed``; torch's global generator is restored afterwards.

:func:`evaluate_model` runs a list of cells plus the sanity cells the cross-cell checks need;
:func:`format_table` renders a paper-style table (``sors evaluate`` runs cells through the pipeline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from sors import attacks as attacks_lib
from sors import checks
from sors.attacks.base import eval_mode, model_device
from sors.config import AttackConfig, EvalConfig
from sors.metrics import wilson_interval
from sors.models import is_randomized, per_example_sampling
from sors.models.supernet import SuperNet, enumerable, every_path_logits, seeded_draws
from sors.tables import format_table  # noqa: F401  (re-exported: the table of evaluate_model's results)


@dataclass
class CellResult:
    """One evaluation cell. ``correct`` is the sum over examples of the mean-over-repeats
    correctness (so ``accuracy = correct / n``); ``ci_low``/``ci_high`` the 95% interval;
    ``all_path_accuracy`` the worst-case view (None for deterministic models), exact over every
    path when ``all_path_exact`` (``all_path_count`` paths), else over that many sampled paths.
    ``example_index`` (n,) indexes the examples in their split; ``example_correct`` is each one's
    correctness averaged over the scoring draws, ``example_correct_min`` its minimum over them."""

    attack: str
    norm: str
    eps: float
    steps: int | None
    eot_samples: int | None
    repeats: int
    n: int
    correct: float
    accuracy: float
    ci_low: float
    ci_high: float
    all_path_accuracy: float | None
    sanity_flags: list[str]
    seconds: float
    attack_spec: dict
    extra: dict = field(default_factory=dict)
    all_path_exact: bool = False
    all_path_count: int | None = None
    example_index: list[int] = field(default_factory=list)
    example_correct: list[float] = field(default_factory=list)
    example_correct_min: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)


def derive_seed(seed: int, *tags: Any) -> int:
    """A 62-bit seed for one phase of a cell (``"attack"``, ``("score", r)``...), stable across runs."""
    digest = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def path_draws(models: Sequence[nn.Module | None], seed: int):
    """Context manager: seed every random draw made inside, each :class:`SuperNet`'s path generator
    and torch's global generator (noise layers, random starts), from ``seed``. Restored on exit."""
    return seeded_draws(models, seed, lambda i: derive_seed(seed, "net", i))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def craft(
    attack: attacks_lib.Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    models: Sequence[nn.Module | None] = (),
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Adversarial images for all ``images``, in batches, under the path draws of ``seed``; and, for
    a suite, each member's per-example fresh-draw accuracy (``attack.member_correct``; NaN where the
    member did not run), concatenated over the batches: ``(adv (N, C, H, W), {member: [N floats]})``."""
    outputs, members = [], {}
    with path_draws(models, seed):
        for s in _batches(len(labels), batch_size):
            outputs.append(attack(images[s], labels[s]))
            for label, values in getattr(attack, "member_correct", {}).items():
                members.setdefault(label, []).extend(float(v) for v in values)
    return torch.cat(outputs), members


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([model(images[s].to(device)).argmax(-1).cpu() for s in _batches(len(images), batch_size)])


def score(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
    seed: int,
    batch_size: int = 250,
    device=None,
) -> torch.Tensor:
    """Per-example correctness averaged over ``repeats`` fresh draws, one path per example: (n,) in [0, 1]."""
    return score_draws(model, images, labels, repeats, seed, batch_size, device).mean(0)


def score_draws(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
    seed: int,
    batch_size: int = 250,
    device=None,
) -> torch.Tensor:
    """Correctness of every example under each of ``repeats`` fresh draws (one path per example):
    (repeats, n) float in {0, 1}. Draw r is seeded by ``derive_seed(seed, "score", r)``."""
    device = device or model_device(model)
    rows = []
    with eval_mode(model), per_example_sampling(model):
        for r in range(repeats):
            with path_draws([model], derive_seed(seed, "score", r)):
                rows.append((_predict(model, images, batch_size, device) == labels.cpu()).float())
    return torch.stack(rows) if rows else torch.zeros(0, len(labels))


def all_path_correct(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    draws: int,
    seed: int,
    batch_size: int = 250,
    device=None,
) -> torch.Tensor:
    """Whether each example is classified correctly under every one of ``draws`` draws: (n,) bool.
    Draw p uses the same path for every example (its generator is re-seeded for each batch)."""
    device = device or model_device(model)
    ok = torch.ones(len(labels), dtype=torch.bool)
    with eval_mode(model), torch.no_grad():
        for p in range(draws):
            for s in _batches(len(labels), batch_size):
                with path_draws([model], derive_seed(seed, "paths", p)):
                    ok[s] &= model(images[s].to(device)).argmax(-1).cpu() == labels[s].cpu()
    return ok


def every_path_correct(
    net: SuperNet, images: torch.Tensor, labels: torch.Tensor, rows_per_call: int = 65536, device=None
) -> torch.Tensor:
    """Whether each example is classified correctly under EVERY path of ``net``, enumerated: (n,) bool.
    Exact (no sampling); runs :func:`every_path_logits` on chunks of at most ``rows_per_call``
    image-paths."""
    device = device or model_device(net)
    chunk = max(1, rows_per_call // net.num_paths)
    ok = torch.ones(len(labels), dtype=torch.bool)
    with eval_mode(net), torch.no_grad():
        for s in _batches(len(labels), chunk):
            logits = every_path_logits(net, images[s].to(device))
            ok[s] = (logits.argmax(-1).cpu() == labels[s].cpu()).all(0)
    return ok


def worst_case_paths(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eval_cfg: EvalConfig, seed: int, device=None
) -> tuple[float | None, bool, int | None]:
    """``(all_path_accuracy, exact, paths)`` for a randomized model (``(None, False, None)`` for a
    deterministic one, or when ``eval.all_paths`` is 0 and the model cannot be enumerated)."""
    if not is_randomized(model):
        return None, False, None
    if enumerable(model, eval_cfg.exact_paths_max):
        correct = every_path_correct(model, images, labels, device=device)
        return float(correct.float().mean()) if len(labels) else 0.0, True, model.num_paths
    if eval_cfg.all_paths <= 0:
        return None, False, None
    correct = all_path_correct(model, images, labels, eval_cfg.all_paths, seed, eval_cfg.batch_size, device)
    return float(correct.float().mean()) if len(labels) else 0.0, False, eval_cfg.all_paths


def _distortion(adv: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    delta = (adv - x).flatten(1)
    changed = delta.abs().amax(1) > 0
    l2 = delta.norm(dim=1)
    return {
        "mean_l2": float(l2[changed].mean()) if changed.any() else 0.0,
        "max_linf": float(delta.abs().max()) if delta.numel() else 0.0,
        "changed_fraction": float(changed.float().mean()) if len(changed) else 0.0,
    }


def _mean_defined(values: list[float]) -> float | None:
    """Mean of the non-NaN values (None when there are none)."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else None


def build_attack(
    model: nn.Module,
    attack: AttackConfig,
    source_model: nn.Module | None = None,
    dataset: str | None = None,
    options: dict | None = None,
) -> attacks_lib.Attack:
    """The attack a config describes: ``steps``/``eot_samples`` None -> the attack's defaults; transfer
    attacks (``transfer``, ``transfer_<base>``) craft on ``source_model``."""
    options = dict(options or {})
    options.update({k: v for k, v in (("steps", attack.steps), ("eot_samples", attack.eot_samples)) if v is not None})
    if attacks_lib.info(attack.name)["transfer"]:
        options["source"] = source_model
    return attacks_lib.build(attack.name, model, attack.eps, dataset=dataset, **options)


def evaluate_cell(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackConfig,
    eval_cfg: EvalConfig,
    seed: int = 0,
    source_model: nn.Module | None = None,
    device="cpu",
    num_classes: int = 10,
    attack_options: dict | None = None,
    dataset: str | None = None,
    example_index: torch.Tensor | None = None,
) -> CellResult:
    """Evaluate one cell; see the module docstring for the protocol.

    Args:
        model: the model under attack (moved to ``device``); images (N, C, H, W) in [0, 1], labels (N,).
        attack: name, eps (pixel scale), steps / eot_samples (None: the attack's paper defaults).
            Transfer attacks (``transfer`` = ``transfer_pgd``, ``transfer_fgsm``, ``transfer_mim``)
            are crafted on ``source_model`` and scored on ``model``.
        eval_cfg: n_examples (cap), repeats, all_paths, batch_size.
        attack_options: extra attack options (``random_start``, ``kappa``, ``binary_search_steps``...).
        dataset: data set family for dataset-dependent defaults (C&W); None: guessed from the images.
        example_index: (N,) each image's index in its split (:func:`sors.data.load_indexed`);
            None: 0..N-1.
    """
    start = time.perf_counter()
    n = min(eval_cfg.n_examples, len(labels))
    x, y = images[:n].detach().float().cpu(), labels[:n].detach().long().cpu()
    model.to(device)
    if source_model is not None:
        source_model.to(device)
    dataset = dataset or attacks_lib.dataset_of(x, num_classes)
    adversary = build_attack(model, attack, source_model, dataset, attack_options)
    randomized = is_randomized(model)
    repeats = eval_cfg.repeats if randomized else 1

    adv, member_outcomes = craft(
        adversary, x, y, eval_cfg.batch_size, derive_seed(seed, "attack"), [model, source_model]
    )
    adv = adv.cpu()
    draws = score_draws(model, adv, y, repeats, seed, eval_cfg.batch_size, device)
    per_example = draws.mean(0)
    correct = float(per_example.sum())
    accuracy = correct / n if n else 0.0
    low, high = wilson_interval(accuracy, n)
    all_path, exact, path_count = worst_case_paths(model, adv, y, eval_cfg, seed, device)
    index = torch.arange(n) if example_index is None else torch.as_tensor(example_index)[:n]

    extra = _distortion(adv, x)
    if member_outcomes:  # the suite: which member broke what (fresh-draw accuracy of its points)
        extra["members"] = {label: _mean_defined(values) for label, values in member_outcomes.items()}
        extra["member_attacked"] = {label: sum(v == v for v in values) for label, values in member_outcomes.items()}
    spec = adversary.spec
    zero_fraction = None
    if attack.name != "none":
        gradient_model = source_model if attacks_lib.info(attack.name)["transfer"] else model
        with path_draws([gradient_model], derive_seed(seed, "gradcheck")):
            zero_fraction = checks.zero_gradient_fraction(
                gradient_model, x.to(device), y.to(device), eval_cfg.batch_size
            )
        extra["zero_grad_fraction"] = zero_fraction
    flags = checks.cell_flags(attack.name, spec["norm"], spec["eps"], accuracy, num_classes, zero_fraction, n, adv, x)
    return CellResult(
        attack=attack.name,
        norm=spec["norm"],
        eps=float(spec["eps"]),
        steps=spec.get("steps"),
        eot_samples=spec.get("eot_samples"),
        repeats=repeats,
        n=n,
        correct=correct,
        accuracy=accuracy,
        ci_low=low,
        ci_high=high,
        all_path_accuracy=all_path,
        sanity_flags=flags,
        seconds=time.perf_counter() - start,
        attack_spec=spec,
        extra=extra,
        all_path_exact=exact,
        all_path_count=path_count,
        example_index=[int(i) for i in index],
        example_correct=per_example.tolist(),
        example_correct_min=(draws.amin(0) if len(draws) else per_example).tolist(),
    )


def paper_attacks(
    dataset: str, names: Sequence[str] = ("none", "fgsm", "pgd", "mim", "cw"), eps_grid: Sequence[float] | None = None
) -> list[AttackConfig]:
    """Cells of the paper's tables: ``none`` and ``cw`` once (eps 0: clean / unbounded), every other
    attack over the data set's eps grid (``EPS_GRIDS[dataset]`` unless ``eps_grid`` is given)."""
    grid = tuple(eps_grid) if eps_grid is not None else attacks_lib.EPS_GRIDS[dataset]
    cells = []
    for name in names:
        attacks_lib.check_name(name)
        cells += [AttackConfig(name, 0.0)] if name in ("none", "cw") else [AttackConfig(name, e) for e in grid]
    return cells


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[AttackConfig],
    eval_cfg: EvalConfig,
    seed: int = 0,
    source_model: nn.Module | None = None,
    device="cpu",
    num_classes: int = 10,
    sanity: bool = True,
    attack_options: dict[str, dict] | None = None,
    dataset: str | None = None,
    on_cell: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    """Every cell of ``attacks`` and, with ``sanity``, the extra cells the cross-cell checks need
    (:func:`sors.checks.sanity_attacks`; marked ``extra["role"] = "sanity"``). Cell i uses seed
    ``derive_seed(seed, name, eps, steps, eot_samples)``. ``attack_options`` maps attack names to
    extra options. Pass the results to :func:`sors.checks.cross_cell_flags` or :func:`format_table`."""
    cells = [(a, "main") for a in attacks]
    if sanity:
        cells += [(a, "sanity") for a in checks.sanity_attacks(attacks, is_randomized(model))]
    results = []
    for cfg, role in cells:
        if attacks_lib.info(cfg.name)["transfer"] and source_model is None:
            continue
        cell_seed = derive_seed(seed, cfg.name, round(cfg.eps, 9), cfg.steps, cfg.eot_samples)
        result = evaluate_cell(
            model,
            images,
            labels,
            cfg,
            eval_cfg,
            cell_seed,
            source_model,
            device,
            num_classes,
            (attack_options or {}).get(cfg.name),
            dataset,
        )
        result.extra["role"] = role
        results.append(result)
        if on_cell:
            on_cell(result)
    return results
