"""The per-example worst case over every attack of one model at one eps (as AutoAttack and
RobustBench report): an example counts as robust only in as far as it survives every attack.

Inputs are cells with per-example outcomes (:class:`sors.evaluation.CellResult` objects or stored
Parquet rows as dicts; schema-1 rows have none and are skipped): for each example index, the
minimum over attacks of its correctness (each a mean over that cell's scoring draws), averaged
over the examples every attack scored. With randomized models the minimum of noisy means leans
low, so the worst case never over-credits the defense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from sors.attacks.base import info
from sors.metrics import wilson_interval


@dataclass(frozen=True)
class WorstCase:
    """Worst case at one eps: accuracy in [0, 1] with its 95% Wilson interval on ``n`` examples,
    and the attacks it is taken over."""

    eps: float
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    attacks: tuple[str, ...]


def _get(cell: Any, key: str):
    return cell.get(key) if isinstance(cell, dict) else getattr(cell, key, None)


def _outcomes(cell: Any) -> dict[int, float] | None:
    index, correct = _get(cell, "example_index"), _get(cell, "example_correct")
    if index is None or correct is None or len(index) == 0:
        return None
    return {int(i): float(c) for i, c in zip(index, correct)}


def counts_for_worst_case(cell: Any) -> bool:
    """A main-role, eps-bounded attack cell (not clean, not an unbounded attack such as C&W)."""
    name = _get(cell, "attack")
    return (
        (_get(cell, "role") or (_get(cell, "extra") or {}).get("role") or "main") == "main"
        and name != "none"
        and not info(name)["unbounded"]
        and float(_get(cell, "eps") or 0) > 0
    )


def worst_case_by_eps(cells: Iterable[Any]) -> dict[float, WorstCase]:
    """``{eps: WorstCase}`` over the cells of ONE model (eps rounded to 9 digits), for every eps with
    at least two attacks that kept per-example outcomes."""
    by_eps: dict[float, list[tuple[str, dict[int, float]]]] = {}
    for cell in cells:
        outcomes = _outcomes(cell) if counts_for_worst_case(cell) else None
        if outcomes:
            by_eps.setdefault(round(float(_get(cell, "eps")), 9), []).append((_get(cell, "attack"), outcomes))
    result = {}
    for eps, entries in sorted(by_eps.items()):
        if len({name for name, _ in entries}) < 2:
            continue
        shared = set.intersection(*(set(o) for _, o in entries))
        if not shared:
            continue
        worst = [min(o[i] for _, o in entries) for i in sorted(shared)]
        accuracy = sum(worst) / len(worst)
        low, high = wilson_interval(accuracy, len(worst))
        result[eps] = WorstCase(eps, accuracy, low, high, len(worst), tuple(sorted({n for n, _ in entries})))
    return result
