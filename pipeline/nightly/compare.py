"""The nightly's verdict: pure functions from two runs' rows to one report line per cell."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from pipeline.nightly.config import Settings
from pipeline.nightly.store import EXIT_OK, EXIT_REGRESSION


@dataclass(frozen=True)
class Thresholds:
    """Comparison rule in accuracy fractions (0.02 = 2 points)."""
    min_drop: float = 0.02
    clean_min_drop: float = 0.02
    fail_on_new_warnings: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> "Thresholds":
        """The rule of a config's ``nightly:`` section (points -> fractions)."""
        return cls(settings.min_drop / 100, settings.clean_min_drop / 100, settings.new_warnings == "fail")


def cell_key(row: dict) -> tuple:
    """What makes two runs' cells the same cell: model (variant), data set, attack, eps, steps, EOT samples,
    seed. Not the checkpoint: a retrained model's cells are compared with the old model's."""
    return (row["dataset"], row.get("variant") or row["trial"], row["attack"], round(float(row["eps"]), 6),
            row.get("steps"), row.get("eot_samples"), int(row.get("seed") or 0))


def flag_kind(flag: str) -> str:
    """A sanity flag without its numbers, so the same warning with other numbers is not "new"."""
    return re.sub(r"\d+(\.\d+)?", "#", flag).strip()


def significant_drop(base: dict, cur: dict, min_drop: float) -> bool:
    """Accuracy fell by more than ``min_drop`` and each accuracy lies outside the other's interval."""
    return (base["accuracy"] - cur["accuracy"] > min_drop and cur["accuracy"] < base["ci_low"]
            and base["accuracy"] > cur["ci_high"])


def compare_cell(base: dict | None, cur: dict | None, th: Thresholds) -> dict:
    """One report line: baseline and current accuracy with intervals, delta in points, verdict, and whether
    the verdict fails the nightly. Verdicts: ok, improved, regression, clean-drop, new-warning, new, missing."""
    row = cur or base
    line = {"key": list(cell_key(row)), "model": row.get("model") or row.get("variant"), "variant": row.get("variant"),
            "dataset": row["dataset"], "attack": row["attack"], "eps": float(row["eps"]), "steps": row.get("steps"),
            "eot_samples": row.get("eot_samples"), "seed": int(row.get("seed") or 0),
            "baseline": _side(base), "current": _side(cur), "delta_points": None, "new_warnings": []}
    if base is None:
        return dict(line, verdict="new", fails=False)
    if cur is None:
        return dict(line, verdict="missing", fails=True)
    line["delta_points"] = round(100 * (cur["accuracy"] - base["accuracy"]), 2)
    clean = row["attack"] == "none"
    old_kinds = {flag_kind(f) for f in base.get("sanity_flags") or []}
    line["new_warnings"] = [f for f in cur.get("sanity_flags") or [] if flag_kind(f) not in old_kinds]
    if significant_drop(base, cur, th.clean_min_drop if clean else th.min_drop):
        return dict(line, verdict="clean-drop" if clean else "regression", fails=True)
    if line["new_warnings"]:
        return dict(line, verdict="new-warning", fails=th.fail_on_new_warnings)
    if significant_drop(cur, base, th.clean_min_drop if clean else th.min_drop):
        return dict(line, verdict="improved", fails=False)
    return dict(line, verdict="ok", fails=False)


def _side(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"accuracy": row["accuracy"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "n": row.get("n"),
            "sanity_flags": list(row.get("sanity_flags") or []), "cell_id": row.get("cell_id"),
            "code_version": row.get("code_version"), "checkpoint_sha256": row.get("checkpoint_sha256")}


def compare(baseline_rows: Iterable[dict], current_rows: Iterable[dict], th: Thresholds) -> list[dict]:
    """Every cell of either run, matched by :func:`cell_key`, as report lines (current order, then missing)."""
    base = {cell_key(r): r for r in baseline_rows}
    cur = {cell_key(r): r for r in current_rows}
    keys = sorted(cur, key=_order) + sorted((k for k in base if k not in cur), key=_order)
    return [compare_cell(base.get(k), cur.get(k), th) for k in keys]


def _order(key: tuple) -> tuple:
    dataset, model, attack, eps, steps, eot, seed = key
    return (dataset, model, attack != "none", attack, eps, steps or 0, eot or 0, seed)


def self_baseline(rows: Iterable[dict]) -> list[dict]:
    """Report lines of a first run, which becomes its own baseline (verdict "baseline")."""
    lines = compare(rows, rows, Thresholds())
    return [dict(line, verdict="baseline", fails=False) for line in lines]


def summarize(lines: list[dict], tracking_missed: int = 0) -> dict:
    """Counts per verdict, the failing lines' count, the runs MLflow missed, and the status and exit
    code they imply: "regression" (1), "tracking-incomplete" (1: no regression, but the MLflow record
    people browse lacks runs; ``sors sync`` repairs it from the files on disk), else "passed" (0)."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["verdict"]] = counts.get(line["verdict"], 0) + 1
    failing = sum(1 for line in lines if line["fails"])
    status = "regression" if failing else ("tracking-incomplete" if tracking_missed else "passed")
    return {"cells": len(lines), "failing": failing, "verdicts": counts, "tracking_missed": tracking_missed,
            "status": status, "exit_code": EXIT_OK if status == "passed" else EXIT_REGRESSION}
