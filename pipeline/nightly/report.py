"""The nightly's report: the headline, ``nightly-report.md`` and ``nightly-report.json``."""

from __future__ import annotations

from pathlib import Path

from pipeline.nightly.store import REPORT_JSON, REPORT_MD, write_json
from pipeline.report import eps_text


def _pct(side: dict | None) -> str:
    if side is None:
        return "—"
    return f"{100 * side['accuracy']:.1f} [{100 * side['ci_low']:.1f}, {100 * side['ci_high']:.1f}]"


def _attack_text(line: dict) -> str:
    if line["attack"] == "none":
        return "clean"
    extra = [f"{line['steps']} steps"] if (line.get("steps") or 0) > 1 else []
    extra += [f"{line['eot_samples']} EOT samples"] if (line.get("eot_samples") or 0) > 1 else []
    return f"{line['attack']} {eps_text(line['eps'])}" + (f" ({', '.join(extra)})" if extra else "")


def cell_name(line: dict) -> str:
    """``SORS pgd 25/255 (2 steps) seed 0``: how a cell is named in reports and messages."""
    return f"{line['model']} {_attack_text(line)}" + (f" seed {line['seed']}" if line["seed"] else "")


def headline(meta: dict, summary: dict) -> str:
    """One line: the verdict of the run (and how many cells could not be paired)."""
    if summary["failing"]:  # a first run compares with itself: it never fails
        return (
            f"REGRESSION: {summary['failing']} of {summary['cells']} cells against baseline {meta['baseline_run_id']}"
        )
    if meta.get("self_accepted"):
        verdict = f"no baseline yet: run {meta['run_id']} accepted itself as the baseline ({summary['cells']} cells)"
    else:
        verdict = f"no regression: {summary['cells']} cells against baseline {meta['baseline_run_id']}"
        unpaired = summary["verdicts"].get("not-comparable", 0)
        if unpaired:
            verdict += (
                f", {unpaired} of them NOT COMPARABLE (no per-example outcomes to pair; "
                "accept a newer run as the baseline)"
            )
    if summary.get("tracking_missed"):
        return f"TRACKING INCOMPLETE: {summary['tracking_missed']} run(s) missing from MLflow; {verdict}"
    return verdict


def _p(value: float | None) -> str:
    """A p-value as the report prints it (3 significant digits, tiny ones in e-notation)."""
    if value is None:
        return "—"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


def _test_cells(line: dict) -> list[str]:
    """The paired-test columns of a line: n paired, b, c, p (drop), Holm p (drop), paired delta."""
    test = line.get("paired")
    if test is None:
        return ["—"] * 6
    return [
        str(test["n"]),
        str(test["b"]),
        str(test["c"]),
        _p(test["p_drop"]),
        _p(test["p_drop_holm"]),
        f"{test['delta_points']:+.1f}",
    ]


def _test_text(line: dict) -> str:
    """``paired n=128, b=9, c=1, p=0.011, Holm p=0.064`` or the reason the cell could not be paired."""
    test = line.get("paired")
    if test is None:
        return line.get("reason") or ""
    return (
        f"paired n={test['n']}, b={test['b']} lost, c={test['c']} gained, {test['delta_points']:+.1f} points, "
        f"p={_p(test['p_drop'])}, Holm p={_p(test['p_drop_holm'])}"
    )


def render_markdown(meta: dict, lines: list[dict], summary: dict) -> str:
    """``nightly-report.md``: verdict, rule, failing cells, then every cell in one table."""
    th = meta["thresholds"]
    out = [
        f"# Nightly {meta['name']} — run {meta['run_id']}",
        "",
        f"**{headline(meta, summary)}**",
        "",
        f"- run date {meta['run_date']}, code {meta['code_version']}, config `{meta['config_path']}`",
        f"- baseline: {meta.get('baseline_run_id') or '—'} ({meta.get('baseline_how') or 'none'})",
        f"- rule: a cell regresses when, on the examples both runs scored, it loses more than "
        f"{th['min_drop_points']:g} points ({th['clean_min_drop_points']:g} for clean accuracy) and the exact "
        f"one-sided McNemar test, Holm-corrected over the night's compared cells, gives p <= {th['alpha']:g}; "
        f"new sanity warnings {'fail' if th['fail_on_new_warnings'] else 'are reported'}",
        "- models: " + ", ".join(f"{m['trial']} {m['how']}" for m in meta.get("models", [])),
        "- verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["verdicts"].items())),
    ]
    if summary.get("tracking_missed"):
        out.append(
            f"- tracking: {summary['tracking_missed']} model run(s) not fully logged to MLflow "
            f"({meta['tracking_uri']}); `sors sync` backfills them from this folder"
        )
    out.append("")
    failing = [line for line in lines if line["fails"]]
    if failing:
        out += ["## Failing cells", ""]
        for line in failing:
            delta = "" if line["delta_points"] is None else f", {line['delta_points']:+.1f} points"
            out.append(
                f"- **{line['verdict']}** {cell_name(line)}: {_pct(line['baseline'])} -> "
                f"{_pct(line['current'])}{delta}" + (f"; {_test_text(line)}" if _test_text(line) else "")
            )
            out += [f"  - new warning: {w}" for w in line["new_warnings"]]
        out.append("")
    out += [
        "## Every cell",
        "",
        "accuracy % [95% interval]; on the examples both runs scored: n paired, b = correct at baseline and "
        "wrong now, c = wrong at baseline and correct now, p = exact one-sided McNemar p of a drop, Holm p = "
        "p adjusted over the night's compared cells, paired delta (points)",
        "",
        "| model | attack | baseline | current | delta (points) | n paired | b | c | p | Holm p | paired delta "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for line in lines:
        delta = "—" if line["delta_points"] is None else f"{line['delta_points']:+.1f}"
        verdict = f"**{line['verdict']}**" if line["fails"] else line["verdict"]
        out.append(
            f"| {line['model']} | {_attack_text(line)}{' seed ' + str(line['seed']) if line['seed'] else ''} "
            f"| {_pct(line['baseline'])} | {_pct(line['current'])} | {delta} | "
            + " | ".join(_test_cells(line))
            + f" | {verdict} |"
        )
    unpaired = [line for line in lines if line.get("reason")]
    if unpaired:
        out += ["", "Not paired:"] + [f"- {cell_name(line)}: {line['reason']}" for line in unpaired]
    return "\n".join(out) + "\n"


def write_reports(folder: Path, meta: dict, lines: list[dict], summary: dict) -> list[Path]:
    """Write ``nightly-report.md`` and ``nightly-report.json`` into the run folder."""
    md, js = folder / REPORT_MD, folder / REPORT_JSON
    md.write_text(render_markdown(meta, lines, summary))
    write_json(js, {"meta": meta, "summary": summary, "headline": headline(meta, summary), "cells": lines})
    return [md, js]
