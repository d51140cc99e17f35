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

Seeds: the attack, each scoring repeat, each worst-case draw and the gradient check get their own
seed derived from the cell's ``seed``; torch's global generator is restored afterwards.

:func:`evaluate_model` runs a list of cells plus the sanity cells the cross-cell checks need;
:func:`format_table` renders a paper-style table (``sors evaluate`` runs cells through the pipeline).
"""

from __future__ import annotations

import contextlib
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
from sors.models.supernet import SuperNet


@dataclass
class CellResult:
    """One evaluation cell. ``correct`` is the sum over examples of the mean-over-repeats
    correctness (so ``accuracy = correct / n``); ``ci_low``/``ci_high`` the 95% interval;
    ``all_path_accuracy`` the worst-case view (None for deterministic models)."""

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)


def derive_seed(seed: int, *tags: Any) -> int:
    """A 62-bit seed for one phase of a cell (``"attack"``, ``("score", r)``...), stable across runs."""
    digest = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@contextlib.contextmanager
def path_draws(models: Sequence[nn.Module | None], seed: int):
    """Seed every random draw made inside: each :class:`SuperNet`'s path generator and torch's global
    generator (noise layers, random starts). Everything is restored on exit."""
    nets = [m for model in models if model is not None for m in model.modules() if isinstance(m, SuperNet)]
    saved = [net.generator for net in nets]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % 2**63)
        for i, net in enumerate(nets):
            net.generator = torch.Generator().manual_seed(derive_seed(seed, "net", i))
        try:
            yield
        finally:
            for net, generator in zip(nets, saved):
                net.generator = generator


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def craft(attack: attacks_lib.Attack, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
          models: Sequence[nn.Module | None] = ()) -> torch.Tensor:
    """Adversarial images for all ``images``, in batches, under the path draws of ``seed``."""
    with path_draws(models, seed):
        return torch.cat([attack(images[s], labels[s]) for s in _batches(len(labels), batch_size)])


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([model(images[s].to(device)).argmax(-1).cpu() for s in _batches(len(images), batch_size)])


def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, repeats: int, seed: int,
          batch_size: int = 250, device=None) -> torch.Tensor:
    """Per-example correctness averaged over ``repeats`` fresh draws, one path per example: (n,) in [0, 1]."""
    device = device or model_device(model)
    correct = torch.zeros(len(labels))
    with eval_mode(model), per_example_sampling(model):
        for r in range(repeats):
            with path_draws([model], derive_seed(seed, "score", r)):
                correct += (_predict(model, images, batch_size, device) == labels.cpu()).float()
    return correct / repeats


def all_path_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, draws: int, seed: int,
                     batch_size: int = 250, device=None) -> torch.Tensor:
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


def _distortion(adv: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    delta = (adv - x).flatten(1)
    changed = delta.abs().amax(1) > 0
    l2 = delta.norm(dim=1)
    return {"mean_l2": float(l2[changed].mean()) if changed.any() else 0.0,
            "max_linf": float(delta.abs().max()) if delta.numel() else 0.0,
            "changed_fraction": float(changed.float().mean()) if len(changed) else 0.0}


def build_attack(model: nn.Module, attack: AttackConfig, source_model: nn.Module | None = None,
                 dataset: str | None = None, options: dict | None = None) -> attacks_lib.Attack:
    """The attack a config describes: ``steps``/``eot_samples`` None -> the attack's defaults; transfer
    attacks (``transfer``, ``transfer_<base>``) craft on ``source_model``."""
    options = dict(options or {})
    options.update({k: v for k, v in (("steps", attack.steps), ("eot_samples", attack.eot_samples)) if v is not None})
    if attack.name.startswith("transfer"):
        options["source"] = source_model
    return attacks_lib.build(attack.name, model, attack.eps, dataset=dataset, **options)


def evaluate_cell(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                  eval_cfg: EvalConfig, seed: int = 0, source_model: nn.Module | None = None, device="cpu",
                  num_classes: int = 10, attack_options: dict | None = None, dataset: str | None = None) -> CellResult:
    """Evaluate one cell; see the module docstring for the protocol.

    Args:
        model: the model under attack (moved to ``device``); images (N, C, H, W) in [0, 1], labels (N,).
        attack: name, eps (pixel scale), steps / eot_samples (None: the attack's paper defaults).
            Transfer attacks (``transfer`` = ``transfer_pgd``, ``transfer_fgsm``, ``transfer_mim``)
            are crafted on ``source_model`` and scored on ``model``.
        eval_cfg: n_examples (cap), repeats, all_paths, batch_size.
        attack_options: extra attack options (``random_start``, ``kappa``, ``binary_search_steps``...).
        dataset: data set family for dataset-dependent defaults (C&W); None: guessed from the images.
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

    adv = craft(adversary, x, y, eval_cfg.batch_size, derive_seed(seed, "attack"), [model, source_model]).cpu()
    per_example = score(model, adv, y, repeats, seed, eval_cfg.batch_size, device)
    correct = float(per_example.sum())
    accuracy = correct / n if n else 0.0
    low, high = wilson_interval(accuracy, n)
    all_path = None
    if randomized and eval_cfg.all_paths > 0:
        all_path = float(all_path_correct(model, adv, y, eval_cfg.all_paths, seed, eval_cfg.batch_size, device)
                         .float().mean())

    extra = _distortion(adv, x)
    spec = adversary.spec
    zero_fraction = None
    if attack.name != "none":
        gradient_model = source_model if attack.name.startswith("transfer") else model
        with path_draws([gradient_model], derive_seed(seed, "gradcheck")):
            zero_fraction = checks.zero_gradient_fraction(gradient_model, x.to(device), y.to(device),
                                                          eval_cfg.batch_size)
        extra["zero_grad_fraction"] = zero_fraction
    flags = checks.cell_flags(attack.name, spec["norm"], spec["eps"], accuracy, num_classes, zero_fraction, n, adv, x)
    return CellResult(attack=attack.name, norm=spec["norm"], eps=float(spec["eps"]), steps=spec.get("steps"),
                      eot_samples=spec.get("eot_samples"), repeats=repeats, n=n, correct=correct, accuracy=accuracy,
                      ci_low=low, ci_high=high, all_path_accuracy=all_path, sanity_flags=flags,
                      seconds=time.perf_counter() - start, attack_spec=spec, extra=extra)


def paper_attacks(dataset: str, names: Sequence[str] = ("none", "fgsm", "pgd", "mim", "cw"),
                  eps_grid: Sequence[float] | None = None) -> list[AttackConfig]:
    """Cells of the paper's tables: ``none`` and ``cw`` once (eps 0: clean / unbounded), every other
    attack over the data set's eps grid (``EPS_GRIDS[dataset]`` unless ``eps_grid`` is given)."""
    grid = tuple(eps_grid) if eps_grid is not None else attacks_lib.EPS_GRIDS[dataset]
    cells = []
    for name in names:
        attacks_lib.check_name(name)
        cells += [AttackConfig(name, 0.0)] if name in ("none", "cw") else [AttackConfig(name, e) for e in grid]
    return cells


def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attacks: Sequence[AttackConfig],
                   eval_cfg: EvalConfig, seed: int = 0, source_model: nn.Module | None = None, device="cpu",
                   num_classes: int = 10, sanity: bool = True, attack_options: dict[str, dict] | None = None,
                   dataset: str | None = None,
                   on_cell: Callable[[CellResult], None] | None = None) -> list[CellResult]:
    """Every cell of ``attacks`` and, with ``sanity``, the extra cells the cross-cell checks need
    (:func:`sors.checks.sanity_attacks`; marked ``extra["role"] = "sanity"``). Cell i uses seed
    ``derive_seed(seed, name, eps, steps, eot_samples)``. ``attack_options`` maps attack names to
    extra options. Pass the results to :func:`sors.checks.cross_cell_flags` or :func:`format_table`."""
    cells = [(a, "main") for a in attacks]
    if sanity:
        cells += [(a, "sanity") for a in checks.sanity_attacks(attacks, is_randomized(model))]
    results = []
    for cfg, role in cells:
        if cfg.name.startswith("transfer") and source_model is None:
            continue
        cell_seed = derive_seed(seed, cfg.name, round(cfg.eps, 9), cfg.steps, cfg.eot_samples)
        result = evaluate_cell(model, images, labels, cfg, eval_cfg, cell_seed, source_model, device, num_classes,
                               (attack_options or {}).get(cfg.name), dataset)
        result.extra["role"] = role
        results.append(result)
        if on_cell:
            on_cell(result)
    return results


# ----------------------------------------------------------------------------------------------
# Tables

_ORDER = ("none", "fgsm", "pgd", "mim", "cw", "ensemble_pgd", "eot_pgd", "autoattack_rand")
_LABELS = {"none": "clean", "fgsm": "FGSM", "pgd": "PGD", "mim": "MIM", "cw": "C&W", "ensemble_pgd": "ens-PGD",
           "eot_pgd": "EOT-PGD", "autoattack_rand": "AA-rand"}


def _column_key(r: CellResult) -> tuple:
    return (r.attack, r.steps, r.eot_samples)


def _column_order(key: tuple) -> tuple:
    name = key[0]
    rank = _ORDER.index(name) if name in _ORDER else len(_ORDER)
    return (rank, name, key[1] or 0, key[2] or 0)


def _column_label(key: tuple, keys: list[tuple], eps_values: list[float]) -> str:
    name, steps, samples = key
    label = _LABELS.get(name, name)
    variants = [k for k in keys if k[0] == name]
    if len(variants) > 1:
        if len({k[2] for k in variants}) > 1 and samples:
            label += f" k={samples}"
        if len({k[1] for k in variants}) > 1 and steps:
            label += f" {steps}st"
    if any(e > 0 for e in eps_values) and name != "none":
        label += " @" + "/".join(f"{e * 255:.4g}" for e in eps_values)
    return label


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell_lines(results: list[CellResult], randomized: bool) -> list[str]:
    lines = ["/".join(_pct(r.accuracy) for r in results),
             "±" + "/".join(f"{100 * (r.ci_high - r.ci_low) / 2:.1f}" for r in results)]
    if randomized:
        lines.append("∀" + "/".join(_pct(r.all_path_accuracy) if r.all_path_accuracy is not None else "-"
                                    for r in results))
    return lines


def _render(rows: list[list[list[str]]]) -> list[str]:
    """Rows of multi-line cells -> text lines with aligned columns."""
    widths = [max(len(line) for row in rows for line in row[c]) for c in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        height = max(len(cell) for cell in row)
        for h in range(height):
            out.append(" | ".join((cell[h] if h < len(cell) else "").ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out


def format_table(results_by_model: dict[str, list[CellResult]], num_classes: int = 10,
                 title: str | None = None) -> str:
    """A paper-style text table: one row per model; columns clean, then each attack over its eps
    grid (in /255): accuracy % per eps, '±' the 95% interval half-widths, '∀' (randomized models)
    the every-path accuracy. Sanity cells and every sanity warning (per cell and across cells) are
    listed under the table."""
    main = {m: [r for r in rs if r.extra.get("role", "main") == "main"] for m, rs in results_by_model.items()}
    keys = sorted({_column_key(r) for rs in main.values() for r in rs}, key=_column_order)
    eps_by_key = {k: sorted({r.eps for rs in main.values() for r in rs if _column_key(r) == k}) for k in keys}
    header = [["model"]] + [[_column_label(k, keys, eps_by_key[k])] for k in keys]
    rows = [header]
    for model_name, rs in main.items():
        randomized = any(r.all_path_accuracy is not None for r in rs)
        row = [[model_name]]
        for k in keys:
            cell = sorted((r for r in rs if _column_key(r) == k), key=lambda r: r.eps)
            row.append(_cell_lines(cell, randomized) if cell else ["-"])
        rows.append(row)
    lines = [title] if title else []
    lines.append("Accuracy (%) under attack; eps on the 0-255 scale; ± = 95% interval half-width; "
                 "∀ = correct under every sampled path")
    lines += _render(rows)
    lines += _sanity_section(results_by_model, num_classes)
    return "\n".join(lines)


def _sanity_section(results_by_model: dict[str, list[CellResult]], num_classes: int) -> list[str]:
    lines = ["", "Sanity checks:"]
    for model_name, rs in results_by_model.items():
        extra_cells = [r for r in rs if r.extra.get("role") == "sanity"]
        if extra_cells:
            lines.append(f"  {model_name}: sanity cells " + ", ".join(
                f"{checks._describe(r)}: {_pct(r.accuracy)}%" for r in extra_cells))
        cross = checks.cross_cell_flags(rs, num_classes)
        # stored results may already carry their cross-cell flags: list each warning once
        warnings = [f"{checks._describe(r)}: {flag}" for i, r in enumerate(rs) for flag in r.sanity_flags
                    if flag not in cross.get(i, [])]
        warnings += [flag for i in sorted(cross) for flag in cross[i]]
        if warnings:
            lines += [f"  WARNING {model_name}: {w}" for w in warnings]
        else:
            lines.append(f"  {model_name}: no warnings")
    return lines
