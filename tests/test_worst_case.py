"""The per-example worst case over the attacks of one model (table column 'Worst case')."""

from __future__ import annotations

import pytest

from pipeline import report
from sors.worst_case import worst_case_by_eps


def row(attack, eps, correct, index=None, role="main", model="SORS"):
    index = list(range(len(correct))) if index is None else index
    n = len(correct)
    return {
        "attack": attack,
        "eps": eps,
        "role": role,
        "model": model,
        "example_index": index,
        "example_correct": correct,
        "n": n,
        "correct": sum(correct),
        "accuracy": sum(correct) / n,
        "ci_low": 0.0,
        "ci_high": 1.0,
        "all_path_accuracy": None,
        "sanity_flags": [],
        "created_at": 0,
        "arch": "sors_lenet5",
    }


def test_worst_case_is_the_per_example_minimum_over_attacks():
    rows = [
        row("pgd", 0.1, [1, 1, 0, 0.5]),
        row("adaptive", 0.1, [1, 0, 1, 0.25]),
        row("fgsm", 0.1, [1, 1, 1, 1]),
        row("none", 0.0, [1, 1, 1, 1]),
        row("pgd", 0.2, [0, 0, 0, 1]),
        row("cw", 0.0, [0, 0, 0, 0]),
    ]
    worst = worst_case_by_eps(rows)
    assert list(worst) == [0.1]  # one attack at 0.2 is no worst case; clean and unbounded C&W never count
    assert worst[0.1].accuracy == pytest.approx((1 + 0 + 0 + 0.25) / 4)
    assert worst[0.1].accuracy <= min(r["accuracy"] for r in rows[:3])
    assert worst[0.1].attacks == ("adaptive", "fgsm", "pgd") and worst[0.1].n == 4


def test_worst_case_pairs_examples_by_their_index_and_skips_rows_without_outcomes():
    rows = [
        row("pgd", 0.1, [1, 0, 1], index=[7, 8, 9]),
        row("adaptive", 0.1, [0, 1], index=[9, 7]),
        dict(row("mim", 0.1, [0, 0, 0]), example_index=None, example_correct=None),  # a schema-1 row
        row("fgsm", 0.1, [0, 0, 0], role="sanity"),
    ]
    worst = worst_case_by_eps(rows)[0.1]
    assert worst.n == 2  # examples 7 and 9 were scored by both attacks
    assert worst.accuracy == pytest.approx(0.5)  # example 7: min(1, 1); example 9: min(1, 0)


def test_the_report_table_ends_with_the_worst_case_columns():
    rows = [row("pgd", 0.1, [1, 1, 0, 0.5]), row("adaptive", 0.1, [1, 0, 1, 0.25]), row("none", 0.0, [1, 1, 1, 1])]
    models, columns, cells, _ = report.table_data(rows)
    eps = report.eps_text(0.1)
    assert [c.label for c in columns] == ["Clean", f"Adaptive {eps}", f"PGD {eps}", f"Worst case {eps}"]
    assert cells[("SORS", columns[-1])].accuracy == pytest.approx((1 + 0 + 0 + 0.25) / 4)
    assert "Worst case" in report.markdown_table(rows)


def test_the_same_cell_stored_twice_does_not_double_n_in_the_report():
    cell = dict(row("pgd", 0.1, [1, 0, 1, 1]), cell_id="abc")
    pooled = report.pooled([cell, dict(cell)])
    assert pooled.n == 4 and pooled.accuracy == pytest.approx(0.75)
    v1 = dict(cell, example_index=None, example_correct=None)
    assert report.pooled([v1, dict(v1)]).n == 4
