"""Obfuscated-gradient sanity checks (Athalye et al. 2018; Carlini et al. 2019; in the spirit of
AutoAttack's ``checks.py``): plain functions that turn evaluation results into warnings.

Per cell (:func:`cell_flags`): input gradients all zero on some examples; eps = 1 not bringing
accuracy down to chance + 5 points; adversarial images outside [0, 1] or the eps-ball.
Across cells of one model (:func:`cross_cell_flags`): an iterative attack weaker than FGSM; more
steps weaker than fewer; EOT weaker than single-sample PGD; white-box weaker than transfer; and
AutoAttack's rand version weaker than EOT-PGD (not a masking sign, but the number to report).

A comparison fires when the stronger-by-design attack leaves accuracy higher by more than ``tol``
(1 point) plus, for randomized models, two standard errors of the difference (the cells' own
path draws make their accuracies noisy). Warnings are strings meant to be shown beside the numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from sors.attacks.base import ce_gradient, eval_mode, info
from sors.config import AttackConfig

CHANCE_MARGIN = 0.05  # eps = 1 must bring accuracy to chance + 5 points
DEFAULT_TOL = 0.01


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Fraction of examples whose input gradient of the CE loss is exactly zero everywhere
    (one forward per batch; the model in eval mode, its flags restored)."""
    if len(y) == 0:
        return 0.0
    zero = 0
    with eval_mode(model), torch.enable_grad():
        for start in range(0, len(y), batch_size):
            grad = ce_gradient(model, x[start : start + batch_size], y[start : start + batch_size])
            zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
    return zero / len(y)


def zero_gradient_flags(fraction: float, n: int) -> list[str]:
    """Warn when any example has an all-zero input gradient (AutoAttack warns on any, too)."""
    if fraction <= 0:
        return []
    return [
        f"zero input gradient on {round(fraction * n)}/{n} examples: gradient-based attacks cannot move "
        "them (gradient masking or a saturated softmax); the accuracy may be overestimated"
    ]


def near_chance_flags(attack: str, norm: str, eps: float, accuracy: float, num_classes: int) -> list[str]:
    """An L-inf attack with eps = 1 may turn any image into any other; accuracy must drop to chance."""
    chance = 1.0 / num_classes
    if norm != "linf" or eps < 1.0 - 1e-9 or accuracy <= chance + CHANCE_MARGIN:
        return []
    return [
        f"{attack} with eps=1 leaves {accuracy:.1%} accuracy, above chance {chance:.0%} + 5 points: "
        "the attack is not finding inputs that must exist (gradient masking?)"
    ]


def bounds_flags(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, atol: float = 1e-5) -> list[str]:
    """Adversarial images must stay in [0, 1] and, for L-inf attacks, within eps of the originals."""
    flags = []
    if adv.min() < -atol or adv.max() > 1 + atol:
        flags.append(f"adversarial pixels outside [0, 1] (min {adv.min():.4f}, max {adv.max():.4f})")
    if norm == "linf" and (adv - x).abs().max() > eps + atol:
        flags.append(f"perturbation {float((adv - x).abs().max()):.5f} exceeds eps {eps:.5f}")
    return flags


def cell_flags(
    attack: str,
    norm: str,
    eps: float,
    accuracy: float,
    num_classes: int,
    zero_grad_fraction: float | None,
    n: int,
    adv: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
) -> list[str]:
    """Every per-cell check, concatenated."""
    flags = zero_gradient_flags(zero_grad_fraction or 0.0, n)
    flags += near_chance_flags(attack, norm, eps, accuracy, num_classes)
    if adv is not None and x is not None:
        flags += bounds_flags(adv, x, eps, norm)
    return flags


def _randomized(result) -> bool:
    return result.all_path_accuracy is not None or result.repeats > 1


def significantly_higher(a, b, tol: float = DEFAULT_TOL) -> bool:
    """Whether result ``a``'s accuracy exceeds ``b``'s by more than ``tol`` plus, when either model
    is randomized, two standard errors of the difference."""
    gap = a.accuracy - b.accuracy
    if not (_randomized(a) or _randomized(b)):
        return gap > tol
    n = max(1, min(a.n, b.n))
    se = math.sqrt((a.accuracy * (1 - a.accuracy) + b.accuracy * (1 - b.accuracy)) / n)
    return gap > tol + 2 * se


def _reaches_eps(result) -> bool:
    """Whether an iterative attack's steps can travel the whole radius (1 step of eps/4 cannot, and
    is then no stronger than FGSM by design)."""
    step = (result.attack_spec or {}).get("step_size")
    if step is None or result.steps is None:
        return True
    return result.steps * step >= result.eps * (1 - 1e-6)


def _eps_text(eps: float) -> str:
    return f"{eps * 255:.4g}/255"


def _describe(r) -> str:
    parts = [r.attack]
    if r.steps is not None and r.attack not in ("fgsm", "none"):
        parts.append(f"{r.steps} steps")
    if r.eot_samples and r.eot_samples > 1:
        parts.append(f"{r.eot_samples} samples")
    return (
        f"{' '.join(parts[:1])}" + (f" ({', '.join(parts[1:])})" if parts[1:] else "") + f" at eps={_eps_text(r.eps)}"
    )


def _weaker(stronger, weaker, why: str) -> str:
    return (
        f"{_describe(stronger)} leaves {stronger.accuracy:.1%} accuracy, more than {_describe(weaker)} "
        f"({weaker.accuracy:.1%}): {why}"
    )


def cross_cell_flags(results: Sequence, num_classes: int = 10, tol: float = DEFAULT_TOL) -> dict[int, list[str]]:
    """Warnings from comparing cells of ONE model: index into ``results`` -> warnings.

    Checks: iterative attacks not weaker than FGSM; more steps not weaker (same attack, eps and
    samples); EOT-PGD not weaker than PGD; white-box not weaker than the transfer attack with the
    same base; the adaptive suite not weaker than any other attack at its eps (else it misses an
    attack and its headline number over-credits the defense). ``results`` are
    :class:`sors.evaluation.CellResult` (or anything with the same fields).
    """
    flags: dict[int, list[str]] = defaultdict(list)
    cells: dict[tuple[str, float], list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        cells[(r.attack, round(r.eps, 9))].append(i)

    def at(name, eps):
        return cells.get((name, round(eps, 9)), [])

    for i, r in enumerate(results):
        eps = r.eps
        if info(r.attack)["iterative"] and _reaches_eps(r):
            for j in at("fgsm", eps):
                if significantly_higher(r, results[j], tol):
                    flags[i].append(
                        _weaker(
                            r,
                            results[j],
                            "an iterative attack should not be weaker than one step "
                            "(gradient masking or too small a step size)",
                        )
                    )
        for j in at(r.attack, eps):
            other = results[j]
            if (
                (other.steps or 0) < (r.steps or 0)
                and other.eot_samples == r.eot_samples
                and significantly_higher(r, other, tol)
            ):
                flags[i].append(_weaker(r, other, "more steps should not weaken an attack (gradient masking?)"))
        if r.attack == "eot_pgd":
            pgds = [j for j in at("pgd", eps) if results[j].steps == r.steps] or at("pgd", eps)
            for j in pgds:
                if significantly_higher(r, results[j], tol):
                    flags[i].append(_weaker(r, results[j], "averaging gradients over draws should not weaken PGD"))
        if info(r.attack)["suite"]:
            for j, other in enumerate(results):
                if (
                    j != i
                    and other.attack != r.attack
                    and round(other.eps, 9) == round(eps, 9)
                    and significantly_higher(r, other, tol)
                ):
                    flags[i].append(
                        _weaker(
                            r,
                            other,
                            "the adaptive suite should be the strongest attack; add the stronger one to its members",
                        )
                    )
        if info(r.attack)["transfer"]:
            base = (r.attack_spec or {}).get("base") or r.attack.partition("_")[2] or "pgd"
            same_steps = [j for j in at(base, eps) if results[j].steps == r.steps]
            for j in same_steps or at(base, eps):
                if significantly_higher(results[j], r, tol):
                    flags[j].append(
                        _weaker(
                            results[j],
                            r,
                            "a white-box attack should beat a transferred one (the white-box gradient is masked?)",
                        )
                    )
    return dict(flags)


def _key(cfg: AttackConfig) -> tuple:
    return (cfg.name, round(cfg.eps, 9), cfg.steps, cfg.eot_samples)


def sanity_attacks(attacks: Sequence[AttackConfig], randomized: bool = False) -> list[AttackConfig]:
    """The extra cells the cross-cell checks need, beyond ``attacks`` (none duplicated):
    FGSM at every eps with an iterative attack; PGD with twice the steps at the largest PGD eps;
    PGD at eps = 1; PGD beside every EOT-PGD; the white-box base beside every transfer cell; and, for
    randomized models, EOT-PGD at the largest PGD eps."""
    have = {_key(a) for a in attacks}
    extra: list[AttackConfig] = []

    def add(cfg: AttackConfig):
        if _key(cfg) not in have:
            have.add(_key(cfg))
            extra.append(cfg)

    for a in attacks:
        if info(a.name)["iterative"]:
            add(AttackConfig("fgsm", a.eps))
        if a.name == "eot_pgd":
            add(AttackConfig("pgd", a.eps, a.steps))
        if info(a.name)["transfer"]:
            add(AttackConfig(a.name.partition("_")[2] or "pgd", a.eps, a.steps))
    pgd = [a for a in attacks if a.name == "pgd" and a.eps < 1]
    if pgd:
        top = max(pgd, key=lambda a: a.eps)
        add(AttackConfig("pgd", top.eps, 2 * (top.steps or 7)))
        if randomized and not any(a.name == "eot_pgd" for a in attacks):
            add(AttackConfig("eot_pgd", top.eps, top.steps))
    add(AttackConfig("pgd", 1.0))
    return extra
