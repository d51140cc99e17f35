"""sors.stats against reference implementations: scipy's exact binomial test, statsmodels' exact
McNemar and Holm correction; and the pairing of two stored rows on their example indices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from sors import stats

GRID = [
    (0, 0),
    (0, 1),
    (1, 0),
    (0, 7),
    (3, 3),
    (5, 6),
    (6, 5),
    (10, 2),
    (2, 10),
    (17, 17),
    (25, 40),
    (120, 95),
    (95, 120),
    (300, 260),
    (450, 450),
    (600, 0),
    (0, 600),
    (1000, 930),
]


@pytest.mark.parametrize("b,c", GRID)
def test_two_sided_mcnemar_matches_scipy_and_statsmodels(b, c):
    p = stats.mcnemar_exact(b, c)
    table = [[50, b], [c, 50]]  # concordant cells do not enter the exact test
    assert p == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9, abs=1e-300)
    if b + c:
        assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)
    else:
        assert p == 1.0


@pytest.mark.parametrize("b,c", GRID)
def test_one_sided_mcnemar_matches_scipy_and_points_the_right_way(b, c):
    worse, better = stats.mcnemar_exact(b, c, "greater"), stats.mcnemar_exact(b, c, "less")
    if b + c == 0:
        assert worse == better == 1.0
        return
    assert worse == pytest.approx(binomtest(b, b + c, 0.5, alternative="greater").pvalue, rel=1e-9, abs=1e-300)
    assert better == pytest.approx(binomtest(b, b + c, 0.5, alternative="less").pvalue, rel=1e-9, abs=1e-300)
    if b > c:  # more examples lost than gained: "worse" is the likelier alternative
        assert worse < better
    # a one-sided p in the observed direction is at most the two-sided one
    assert min(worse, better) <= stats.mcnemar_exact(b, c) + 1e-12


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="alternative"):
        stats.mcnemar_exact(3, 1, "worse")
    with pytest.raises(ValueError, match=">= 0"):
        stats.mcnemar_exact(-1, 2)


@pytest.mark.parametrize("seed", range(12))
def test_holm_matches_statsmodels_on_random_p_values(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 40))
    p = rng.uniform(0, 1, m) ** rng.uniform(0.5, 6)  # from uniform to many small p-values
    if seed % 3 == 0:
        p[: m // 2] = p[0]  # ties
    for alpha in (0.01, 0.05, 0.2):
        reject, corrected, _, _ = multipletests(p, alpha=alpha, method="holm")
        assert stats.holm(p) == pytest.approx(list(corrected), rel=1e-12, abs=1e-15)
        assert stats.holm_reject(p, alpha) == list(reject)


def test_holm_is_monotone_capped_and_stricter_than_no_correction():
    p = [0.04, 0.001, 0.03, 0.5, 0.02]
    adjusted = stats.holm(p)
    order = np.argsort(p)
    assert all(np.diff(np.array(adjusted)[order]) >= 0) and max(adjusted) <= 1.0
    assert all(a >= raw for a, raw in zip(adjusted, p))
    assert stats.holm_reject(p, 0.05) == [False, True, False, False, False]  # plain p < 0.05 would reject four
    assert stats.holm([]) == [] and stats.holm_reject([], 0.05) == []


def _row(index, correct, **extra):
    return {"cell_id": "x", "schema_version": 2, "example_index": index, "example_correct": correct, **extra}


def test_paired_outcomes_counts_discordant_examples_on_the_shared_indices():
    base = _row([0, 1, 2, 3, 4, 5], [1.0, 1.0, 0.0, 0.0, 1.0, 0.6])
    cur = _row([5, 4, 3, 2, 1, 9], [0.4, 1.0, 1.0, 0.0, 0.0, 1.0])  # other order, index 0 and 9 unpaired
    paired = stats.paired_outcomes(base, cur)
    # 1: lost; 3: gained; 5: correct on 60% of draws before, 40% now: lost (majority rule)
    assert (paired.n, paired.b, paired.c) == (5, 2, 1)
    assert paired.base_accuracy == pytest.approx(3 / 5) and paired.current_accuracy == pytest.approx(2 / 5)
    assert paired.drop == pytest.approx((paired.b - paired.c) / paired.n)


def test_paired_outcomes_reads_rows_as_pandas_returns_them_and_says_when_nothing_pairs():
    frame = pd.DataFrame(
        [_row(np.arange(4), np.array([1.0, 0.0, 1.0, 0.5])), _row(np.arange(4, 8), np.array([1.0, 1.0, 1.0, 1.0]))]
    )
    first, second = frame.to_dict("records")
    assert isinstance(first["example_index"], np.ndarray)
    assert stats.paired_outcomes(first, first) == stats.Paired(4, 0, 0, 0.75, 0.75)  # 0.5 counts as correct
    assert stats.paired_outcomes(first, second).n == 0
    v1 = {"cell_id": "old", "schema_version": 1, "accuracy": 0.5}
    assert not stats.has_outcomes(v1) and stats.has_outcomes(first)
    with pytest.raises(ValueError, match="schema version 1"):
        stats.paired_outcomes(v1, first)
    with pytest.raises(ValueError, match="twice"):
        stats.outcomes(_row([1, 1], [1.0, 0.0]))
