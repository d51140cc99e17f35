"""The nightly in MLflow: one parent run per night in experiment ``nightly-<name>`` (the night's trial
runs nest under it), its verdict, report and the trend over nights; and the registry alias
``baseline``, which ``--accept`` moves to the accepted night's model versions and which decides the
night a new run is compared against (``baseline.json`` is the cache of that choice)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from pipeline.cliutil import tracking_line
from pipeline.nightly.store import EXIT_COULD_NOT_RUN, RUN_JSON
from pipeline.store import records, results
from pipeline.tracking import model_registry
from pipeline.tracking import runs as tracking

log = logging.getLogger("pipeline.nightly")
TREND_PNG, TREND_CSV = "nightly-trend.png", "nightly-trend.csv"


def night_parent(tracking_uri: str, experiment_id: str, name: str, run_id: str, code_version: str) -> str:
    """The parent run of night ``run_id`` of nightly ``name`` (created when missing)."""
    tags = {
        "nightly": "true",
        tracking.TAG_ROLE: "nightly",
        "sors.nightly.name": name,
        "sors.nightly.run_id": run_id,
        tracking.TAG_CODE: code_version,
        tracking.TAG_SWEEP: f"nightly-{name}",
    }
    return tracking.parent_run(tracking_uri, experiment_id, f"nightly:{run_id}", f"nightly {run_id}", tags)


# ---------------------------------------------------------------- the trend over nights


def _night_points(folder: Path) -> list[dict]:
    """One point per model of a night: clean accuracy and adaptive accuracy (else the worst attack's)."""
    run = json.loads((folder / RUN_JSON).read_text()) if (folder / RUN_JSON).is_file() else {}
    rows = results.read_rows(folder / "cells") if (folder / "cells").is_dir() else []
    points = []
    for model in sorted({r.get("model") or r.get("variant") or r["trial"] for r in rows}):
        mine = [r for r in rows if (r.get("model") or r.get("variant") or r["trial"]) == model]
        clean = [r["accuracy"] for r in mine if r["attack"] == "none"]
        adaptive = [r["accuracy"] for r in mine if r["attack"] == "adaptive"]
        attacked = [r["accuracy"] for r in mine if r["attack"] != "none" and r.get("role") != "sanity"]
        points.append(
            {
                "night": folder.name.split("=", 1)[1],
                "status": run.get("status"),
                "model": model,
                "clean_acc": sum(clean) / len(clean) if clean else None,
                "adaptive_acc": min(adaptive) if adaptive else None,
                "worst_attack_acc": min(attacked) if attacked else None,
            }
        )
    return points


def trend(root: Path) -> list[dict]:
    """Every finished night's points (oldest first)."""
    return [
        p
        for folder in sorted(root.glob("runs/run_date=*/run_id=*"), key=lambda f: f.name)
        for p in _night_points(folder)
    ]


def write_trend(root: Path, folder: Path) -> list[Path]:
    """``nightly-trend.png`` and ``.csv`` in the night's folder: clean and adaptive accuracy per night and
    model (the worst attack's accuracy stands in where a night has no adaptive cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    points = pd.DataFrame(trend(root))
    csv, png = folder / TREND_CSV, folder / TREND_PNG
    points.to_csv(csv, index=False)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for model, group in points.groupby("model") if len(points) else []:
        x = list(range(len(group)))
        ax.plot(x, group["clean_acc"], marker="o", label=f"{model} clean")
        robust = group["adaptive_acc"].where(group["adaptive_acc"].notna(), group["worst_attack_acc"])
        ax.plot(x, robust, marker="s", linestyle="--", label=f"{model} adaptive (or worst attack)")
        ax.set_xticks(x, [n[:15] for n in group["night"]], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"nightly {root.name}: accuracy per night")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png, csv]


def _night_metrics(points: list[dict], night: str) -> dict[str, float]:
    metrics = {}
    for point in (p for p in points if p["night"] == night):
        for key in ("clean_acc", "adaptive_acc", "worst_attack_acc"):
            if point[key] is not None:
                metrics[f"{key}.{re.sub(r'[^A-Za-z0-9_.-]+', '_', point['model'])}"] = point[key]
    return metrics


def log_night(
    tracking_uri: str,
    parent_run_id: str | None,
    experiment_id: str,
    root: Path,
    folder: Path,
    meta: dict,
    summary: dict,
    files: list[Path],
    status: str,
) -> str | None:
    """Counts, per-model accuracies, report and trend on the night's parent run, then its status.
    Returns the run id (None when MLflow could not be reached; the report is on disk regardless)."""
    try:
        run_id = parent_run_id or night_parent(
            tracking_uri, experiment_id, meta["name"], meta["run_id"], meta["code_version"]
        )
        client = tracking.client(tracking_uri)
        client.set_tag(run_id, "sors.nightly.verdict", status)
        client.set_tag(run_id, "sors.nightly.baseline", meta.get("baseline_run_id") or "")
        metrics = {"cells": summary["cells"], "failing_cells": summary["failing"], "exit_code": meta["exit_code"]}
        metrics.update({f"verdict_{k.replace('-', '_')}": v for k, v in summary["verdicts"].items()})
        trend_files = write_trend(root, folder)
        metrics.update(_night_metrics(trend(root), meta["run_id"]))
        tracking.log_metrics(tracking_uri, run_id, metrics)
        tracking.log_artifacts(tracking_uri, run_id, files, "nightly")
        tracking.log_artifacts(tracking_uri, run_id, trend_files, "trend")
        client.set_terminated(run_id, "FINISHED" if meta["exit_code"] != EXIT_COULD_NOT_RUN else "FAILED")
        return run_id
    except Exception as err:  # noqa: BLE001 -- tracking trouble must not hide the verdict
        log.warning("could not log the nightly to MLflow: %s", tracking_line(err))
        return None


# ---------------------------------------------------------------- the baseline alias


def night_versions(folder: Path) -> dict[str, str]:
    """``{registered model: version}`` of the models a night evaluated (from its model records)."""
    found = {}
    for record in records.all_records(folder):
        named = record.registered_model or {}
        if named.get("name") and named.get("version"):
            found[named["name"]] = str(named["version"])
    return found


def move_baseline(tracking_uri: str, folder: Path) -> dict[str, str]:
    """Point alias ``baseline`` of each model of the night in ``folder`` at the night's version.
    Returns the versions (empty when the night's models were never registered)."""
    versions = night_versions(folder)
    model_registry.set_alias(tracking_uri, versions)
    return versions


def alias_night(tracking_uri: str, root: Path, candidates: list[str]) -> str | None:
    """The night whose model versions alias ``baseline`` points at: the newest of ``candidates`` (night
    ids, newest first) whose registered versions all carry the alias; None when none matches (or no
    model has the alias yet)."""
    folders = {f.name.split("=", 1)[1]: f for f in root.glob("runs/run_date=*/run_id=*")}
    names = sorted({name for night in candidates if night in folders for name in night_versions(folders[night])})
    aliased = model_registry.alias_versions(tracking_uri, names)
    if not aliased:
        return None
    for night in candidates:
        versions = night_versions(folders[night]) if night in folders else {}
        if versions and all(aliased.get(name) == version for name, version in versions.items()):
            return night
    return None
