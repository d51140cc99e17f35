"""Exact paired tests on per-example outcomes: McNemar, Holm's step-down correction, pairing of rows.

Used by the nightly regression (a cell regresses when the same examples are classified worse) and
written with the standard library only (exact binomial sums in integer arithmetic), so ``sors``
needs no statistics package. Reference values in the tests come from scipy and statsmodels.

Outcome of an example: its ``example_correct`` is the mean correctness over the cell's scoring
draws (exactly 0 or 1 for a deterministic model). An example counts as *classified correctly* when
it is correct on at least half of the draws (``example_correct >= 0.5``, :data:`CORRECT_AT`): the
majority reading of "correct", which is the plain 0/1 outcome for deterministic models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CORRECT_AT = 0.5  # an example is correct when correct on at least this fraction of its scoring draws
ALTERNATIVES = ("two-sided", "greater", "less")


def _binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (integer sum of binomial coefficients over 2**n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    term, total = 1, 1  # C(n, 0)
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        total += term
    return total / (1 << n)  # int / int is correctly rounded, however large


def mcnemar_exact(b: int, c: int, alternative: str = "two-sided") -> float:
    """Exact McNemar test on the discordant counts of a paired comparison; returns the p-value.

    Args:
        b: examples correct at baseline and wrong now (lost); c: wrong at baseline and correct now (gained).
        alternative: ``"two-sided"`` (any change), ``"greater"`` (the current run is worse: more examples
            lost than gained, b > c) or ``"less"`` (the current run is better, b < c).

    Under the null each discordant example is lost or gained with probability 1/2, so b ~ Binomial(b + c, 1/2).
    Two-sided: min(1, 2 P(X <= min(b, c))), as scipy's ``binomtest`` and statsmodels' ``mcnemar(exact=True)``;
    "greater": P(X >= b); "less": P(X <= b). p = 1 when there is no discordant example.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    n = b + c
    if n == 0:
        return 1.0
    if alternative == "greater":
        return _binomial_tail(c, n)  # P(X >= b) = P(n - X <= c), and n - X has the same law
    if alternative == "less":
        return _binomial_tail(b, n)
    return min(1.0, 2.0 * _binomial_tail(min(b, c), n))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    The i-th smallest of m p-values is multiplied by (m - i + 1), made monotone (never below the
    adjusted value of a smaller p) and capped at 1. Rejecting where the adjusted p <= alpha controls
    the family-wise error rate at alpha.
    """
    p = [float(v) for v in p_values]
    if any(not 0.0 <= v <= 1.0 for v in p):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def holm_reject(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family-wise level ``alpha`` (input order):
    walk the p-values from the smallest, reject while the i-th smallest is <= alpha / (m - i + 1)."""
    p = [float(v) for v in p_values]
    m = len(p)
    reject = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        if p[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject


def has_outcomes(row: dict) -> bool:
    """Whether a stored row carries per-example outcomes (schema version 2 and later)."""
    return row.get("example_index") is not None and row.get("example_correct") is not None


def outcomes(row: dict) -> dict[int, float]:
    """``{example index in its data set split: mean correctness over the scoring draws}`` of a row.

    Accepts lists or numpy arrays (as pyarrow and pandas return them). ValueError when the row has
    no outcomes, the two lists differ in length, or an index repeats.
    """
    if not has_outcomes(row):
        raise ValueError(f"row {row.get('cell_id')} has no per-example outcomes (schema version 1)")
    index = np.asarray(row["example_index"], dtype=np.int64).ravel()
    correct = np.asarray(row["example_correct"], dtype=np.float64).ravel()
    if index.shape != correct.shape:
        raise ValueError(f"row {row.get('cell_id')}: {index.size} example indices but {correct.size} outcomes")
    mapping = dict(zip(index.tolist(), correct.tolist()))
    if len(mapping) != index.size:
        raise ValueError(f"row {row.get('cell_id')}: an example index appears twice")
    return mapping


@dataclass(frozen=True)
class Paired:
    """Two rows' outcomes on the examples both scored.

    ``n``: paired examples; ``b``: correct at baseline and wrong now; ``c``: wrong at baseline and correct
    now (correct = :data:`CORRECT_AT` or more of the draws). ``base_accuracy`` / ``current_accuracy``: the
    fraction classified correctly on the paired set (so ``base - current = (b - c) / n``).
    """

    n: int
    b: int
    c: int
    base_accuracy: float
    current_accuracy: float

    @property
    def drop(self) -> float:
        """Accuracy lost on the paired set, as a fraction (negative when the current run is better)."""
        return self.base_accuracy - self.current_accuracy

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: n, b, c and both accuracies."""
        return {
            "n": self.n,
            "b": self.b,
            "c": self.c,
            "base_accuracy": self.base_accuracy,
            "current_accuracy": self.current_accuracy,
        }


def paired_outcomes(base_row: dict, cur_row: dict) -> Paired:
    """Pair two rows' examples on ``example_index`` (their intersection) and count the discordant ones.

    Each example is binarised as correct when ``example_correct >= CORRECT_AT`` (correct on the majority
    of its scoring draws). ``n`` = 0 when the rows share no example. ValueError when a row has no outcomes.
    """
    base, cur = outcomes(base_row), outcomes(cur_row)
    shared = sorted(base.keys() & cur.keys())
    before = np.array([base[i] >= CORRECT_AT for i in shared], dtype=bool)
    now = np.array([cur[i] >= CORRECT_AT for i in shared], dtype=bool)
    n = len(shared)
    b, c = int(np.sum(before & ~now)), int(np.sum(~before & now))
    return Paired(
        n=n,
        b=b,
        c=c,
        base_accuracy=float(before.mean()) if n else 0.0,
        current_accuracy=float(now.mean()) if n else 0.0,
    )
