"""The nightly's verdict: pure functions from two runs' rows to one report line per cell.

A cell regresses when the same examples are classified worse: an exact one-sided McNemar test on the
examples both runs scored (paired on ``example_index``; an example is correct when correct on at least
half of its scoring draws), Holm-corrected over the night's compared cells at ``alpha``, AND a drop on
the paired examples of more than ``min_drop`` (``clean_min_drop`` for clean accuracy). Rows without
per-example outcomes (schema v1) or without a shared example give the verdict "not-comparable".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from pipeline.nightly.config import Settings
from pipeline.nightly.store import EXIT_OK, EXIT_REGRESSION
from sors import stats


@dataclass(frozen=True)
class Thresholds:
    """Comparison rule: minimum drops in accuracy fractions (0.02 = 2 points) and the family-wise level
    of the paired tests (Holm over the night's compared cells)."""

    min_drop: float = 0.02
    clean_min_drop: float = 0.02
    fail_on_new_warnings: bool = True
    alpha: float = 0.05

    @classmethod
    def from_settings(cls, settings: Settings) -> "Thresholds":
        """The rule of a config's ``nightly:`` section (points -> fractions)."""
        return cls(
            settings.min_drop / 100, settings.clean_min_drop / 100, settings.new_warnings == "fail", settings.alpha
        )


def cell_key(row: dict) -> tuple:
    """What makes two runs' cells the same cell: model (variant), data set, attack, eps, steps, EOT samples,
    seed. Not the checkpoint: a retrained model's cells are compared with the old model's."""
    return (
        row["dataset"],
        row.get("variant") or row["trial"],
        row["attack"],
        round(float(row["eps"]), 6),
        row.get("steps"),
        row.get("eot_samples"),
        int(row.get("seed") or 0),
    )


def flag_kind(flag: str) -> str:
    """A sanity flag without its numbers, so the same warning with other numbers is not "new"."""
    return re.sub(r"\d+(\.\d+)?", "#", flag).strip()


# ---------------------------------------------------------------- the paired test of one cell


def not_comparable(base: dict, cur: dict) -> str | None:
    """Why two rows of a cell cannot be paired (no per-example outcomes on a side, no shared example),
    or None when they can."""
    missing = [side for side, row in (("baseline", base), ("current run", cur)) if not stats.has_outcomes(row)]
    if missing:
        return (
            f"not comparable: the {' and the '.join(missing)} stored no per-example outcomes (schema v1); "
            "accept a run with them (sors nightly --accept RUN)"
        )
    if not stats.outcomes(base).keys() & stats.outcomes(cur).keys():
        return "not comparable: the two runs scored different examples (no example index in common)"
    return None


def paired_test(base: dict, cur: dict) -> dict:
    """The cell's paired comparison on the examples both runs scored: ``n`` paired, ``b`` (correct at
    baseline, wrong now), ``c`` (wrong at baseline, correct now), the paired accuracies, ``delta_points``
    (current - baseline on the paired set, points) and the one-sided exact McNemar p-values ``p_drop``
    (the current run is worse) and ``p_gain`` (it is better). Needs per-example outcomes on both rows."""
    paired = stats.paired_outcomes(base, cur)
    return dict(
        paired.to_dict(),
        delta_points=round(-100 * paired.drop, 2),
        p_drop=stats.mcnemar_exact(paired.b, paired.c, "greater"),
        p_gain=stats.mcnemar_exact(paired.b, paired.c, "less"),
    )


def with_holm(tests: list[dict]) -> list[dict]:
    """The paired tests of a night with ``p_drop_holm`` / ``p_gain_holm``: each direction Holm-adjusted
    over all of them (one family per direction: every compared cell of the night)."""
    drops = stats.holm([t["p_drop"] for t in tests])
    gains = stats.holm([t["p_gain"] for t in tests])
    return [dict(t, p_drop_holm=d, p_gain_holm=g) for t, d, g in zip(tests, drops, gains)]


def _moved(test: dict, direction: str, min_drop: float, alpha: float) -> bool:
    """Whether the paired set lost (direction "drop") or gained ("gain") more than ``min_drop`` (fraction)
    with a Holm-adjusted one-sided p at most ``alpha``."""
    drop = test["base_accuracy"] - test["current_accuracy"]
    change = drop if direction == "drop" else -drop
    return change > min_drop and test[f"p_{direction}_holm"] <= alpha


# ---------------------------------------------------------------- report lines


def compare_cell(base: dict | None, cur: dict | None, th: Thresholds, test: dict | None = None) -> dict:
    """One report line: both sides' accuracy with intervals, delta in points, the paired test, the verdict
    and whether it fails the nightly. Verdicts: regression, clean-drop, new-warning, improved, ok,
    not-comparable, new, missing.

    ``test``: the cell's :func:`paired_test` with Holm-adjusted p-values (:func:`compare` passes the night's);
    None: computed here, as a family of one cell (adjusted p = p).
    """
    row = cur or base
    line = {
        "key": list(cell_key(row)),
        "model": row.get("model") or row.get("variant"),
        "variant": row.get("variant"),
        "dataset": row["dataset"],
        "attack": row["attack"],
        "eps": float(row["eps"]),
        "steps": row.get("steps"),
        "eot_samples": row.get("eot_samples"),
        "seed": int(row.get("seed") or 0),
        "baseline": _side(base),
        "current": _side(cur),
        "delta_points": None,
        "paired": None,
        "reason": None,
        "new_warnings": [],
    }
    if base is None:
        return dict(line, verdict="new", fails=False)
    if cur is None:
        return dict(line, verdict="missing", fails=True)
    line["delta_points"] = round(100 * (cur["accuracy"] - base["accuracy"]), 2)
    old_kinds = {flag_kind(f) for f in base.get("sanity_flags") or []}
    line["new_warnings"] = [f for f in cur.get("sanity_flags") or [] if flag_kind(f) not in old_kinds]
    line["reason"] = not_comparable(base, cur)
    if line["reason"] is None:
        line["paired"] = test if test is not None else with_holm([paired_test(base, cur)])[0]
    return dict(line, **_verdict(line, th))


def _verdict(line: dict, th: Thresholds) -> dict:
    """``{"verdict", "fails"}`` of a line that has both sides."""
    clean = line["attack"] == "none"
    min_drop = th.clean_min_drop if clean else th.min_drop
    test = line["paired"]
    if test is not None and _moved(test, "drop", min_drop, th.alpha):
        return {"verdict": "clean-drop" if clean else "regression", "fails": True}
    if line["new_warnings"]:
        return {"verdict": "new-warning", "fails": th.fail_on_new_warnings}
    if test is None:
        return {"verdict": "not-comparable", "fails": False}
    if _moved(test, "gain", min_drop, th.alpha):
        return {"verdict": "improved", "fails": False}
    return {"verdict": "ok", "fails": False}


def _side(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {
        "accuracy": row["accuracy"],
        "ci_low": row["ci_low"],
        "ci_high": row["ci_high"],
        "n": row.get("n"),
        "sanity_flags": list(row.get("sanity_flags") or []),
        "cell_id": row.get("cell_id"),
        "code_version": row.get("code_version"),
        "checkpoint_sha256": row.get("checkpoint_sha256"),
    }


def compare(baseline_rows: Iterable[dict], current_rows: Iterable[dict], th: Thresholds) -> list[dict]:
    """Every cell of either run, matched by :func:`cell_key`, as report lines (current order, then missing).
    The paired tests of all cells that can be paired form one Holm family per direction."""
    base = {cell_key(r): r for r in baseline_rows}
    cur = {cell_key(r): r for r in current_rows}
    keys = sorted(cur, key=_order) + sorted((k for k in base if k not in cur), key=_order)
    pairable = [k for k in keys if k in base and k in cur and not_comparable(base[k], cur[k]) is None]
    tests = dict(zip(pairable, with_holm([paired_test(base[k], cur[k]) for k in pairable])))
    return [compare_cell(base.get(k), cur.get(k), th, tests.get(k)) for k in keys]


def _order(key: tuple) -> tuple:
    dataset, model, attack, eps, steps, eot, seed = key
    return (dataset, model, attack != "none", attack, eps, steps or 0, eot or 0, seed)


def self_baseline(rows: Iterable[dict]) -> list[dict]:
    """Report lines of a first run, which becomes its own baseline (verdict "baseline")."""
    lines = compare(rows, rows, Thresholds())
    return [dict(line, verdict="baseline", fails=False, reason=None) for line in lines]


def summarize(lines: list[dict], tracking_missed: int = 0) -> dict:
    """Counts per verdict, the failing lines' count, the runs MLflow missed, and the status and exit
    code they imply: "regression" (1), "tracking-incomplete" (1: no regression, but the MLflow record
    people browse lacks runs; ``sors sync`` repairs it from the files on disk), else "passed" (0)."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["verdict"]] = counts.get(line["verdict"], 0) + 1
    failing = sum(1 for line in lines if line["fails"])
    status = "regression" if failing else ("tracking-incomplete" if tracking_missed else "passed")
    return {
        "cells": len(lines),
        "failing": failing,
        "verdicts": counts,
        "tracking_missed": tracking_missed,
        "status": status,
        "exit_code": EXIT_OK if status == "passed" else EXIT_REGRESSION,
    }
