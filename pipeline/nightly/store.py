"""The nightly's files: run folders and their ``run.json``, the accepted-baseline pointer and its log,
and the model records an earlier run of the same code can lend to this one (layout: ``pipeline.nightly``)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK
from pipeline.nightly.config import RUN_ID, NightlyConfig
from pipeline.plan import presets
from pipeline.store import records
from sors import config as config_lib
from sors.errors import ConfigError
from tasks import storage

EXIT_REGRESSION = EXIT_CHECK_FAILED  # exit 1: a cell regressed (or MLflow missed runs)
EXIT_COULD_NOT_RUN = EXIT_BAD_INPUT  # exit 2: bad input, or the nightly could not run
REPORT_MD, REPORT_JSON, RUN_JSON = "nightly-report.md", "nightly-report.json", "run.json"


def nightly_root(results_dir: str | os.PathLike, name: str) -> Path:
    """``<results>/nightly/<name>``: baseline pointer, acceptance log and runs of one nightly."""
    return Path(results_dir) / "nightly" / name


def new_run_id(now: datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-xxxx`` (UTC start time + 4 random hex digits): sortable and unique."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


def run_dir(root: Path, run_id: str) -> Path:
    """Folder of one run, under its run-date partition."""
    match = RUN_ID.match(run_id)
    if not match:
        raise ConfigError("run", f"{run_id!r} is not a nightly run id", "YYYYmmddTHHMMSSZ-xxxx")
    day = match.group(1)
    return root / "runs" / f"run_date={day[:4]}-{day[4:6]}-{day[6:]}" / f"run_id={run_id}"


def find_run(results_dir: str | os.PathLike, run_id: str) -> Path:
    """The folder of run ``run_id`` in any nightly under ``results_dir`` (ConfigError when unknown)."""
    if not RUN_ID.match(str(run_id)):
        raise ConfigError(
            "run", f"{run_id!r} is not a nightly run id", "YYYYmmddTHHMMSSZ-xxxx, see `ls <results>/nightly/*/runs/*`"
        )
    hits = sorted(Path(results_dir, "nightly").glob(f"*/runs/run_date=*/run_id={run_id}"))
    if not hits:
        raise ConfigError("run", f"no nightly run {run_id} under {Path(results_dir, 'nightly')}")
    return hits[0]


def read_run(folder: Path) -> dict:
    """The ``run.json`` of a run folder."""
    return json.loads((folder / RUN_JSON).read_text())


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_baseline(root: Path) -> dict | None:
    """The accepted-baseline pointer of a nightly, or None before the first run."""
    path = root / "baseline.json"
    return json.loads(path.read_text()) if path.is_file() else None


def accept(results_dir: str | os.PathLike, run_id: str, how: str = "--accept") -> tuple[dict, dict | None]:
    """Make ``run_id`` the baseline of its nightly. Returns (new pointer, previous pointer or None).

    Only runs that finished their evaluation (exit 0 or 1) can be accepted.
    """
    folder = find_run(results_dir, run_id)
    run = read_run(folder)
    if run.get("exit_code") not in (EXIT_OK, EXIT_REGRESSION):
        raise ConfigError(
            "run",
            f"run {run_id} did not finish its evaluation ({run.get('status')}: "
            f"{run.get('reason') or 'no reason recorded'}); only finished runs can be accepted",
        )
    root = nightly_root(results_dir, run["name"])
    previous = read_baseline(root)
    pointer = {
        "run_id": run_id,
        "accepted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "how": how,
        "previous": previous["run_id"] if previous else None,
    }
    write_json(root / "baseline.json", pointer)
    with open(root / "accepted.jsonl", "a") as handle:
        handle.write(json.dumps(pointer) + "\n")
    return pointer, previous


def reusable_records(root: Path, sweep_name: str, code_version: str, before: str) -> dict[tuple[str, str], dict]:
    """``{(trial, config hash): record}`` of models trained by earlier runs of this nightly under the same
    code version whose checkpoint is still there (newest run wins)."""
    found: dict[tuple[str, str], records.ModelRecord] = {}
    for path in sorted(root.glob(f"runs/run_date=*/run_id=*/models/{sweep_name}/*.json"), reverse=True):
        if path.parts[-4] >= f"run_id={before}":
            continue  # this run or a later one
        try:
            record = records.read_record(path)
        except (OSError, ValueError, TypeError):
            continue
        key = (record.trial, record.config_hash)
        if key in found or record.code_version != code_version:
            continue
        uri = record.checkpoint_uri or ""
        if storage.is_remote(uri) or Path(uri.removeprefix("file://")).is_file():
            found[key] = dataclasses.replace(
                record, nightly_origin=record.nightly_origin or path.parts[-4].split("=", 1)[1]
            )
    return found


def seed_reused_models(cfg: NightlyConfig, root: Path, folder: Path, code_version: str, run_id: str) -> list[dict]:
    """Copy reusable model records into this run, so the sweep evaluates them instead of training.

    Goes stage by stage, because a student's config hash includes its teacher's checkpoint. Returns
    ``[{"trial", "how": "reused from RUN" | "trained", "config_hash"}]``.
    """
    candidates = reusable_records(root, cfg.sweep.name, code_version, run_id)
    models = []
    for stage in presets.stages(cfg.sweep.trials):
        for trial in stage:
            teacher = trial.teacher_trial
            if teacher:
                record = records.load_record(str(folder), cfg.sweep.name, teacher)
                if record is None:  # teacher will be trained in this run: so will the student
                    models.append({"trial": trial.name, "how": "trained", "config_hash": None})
                    continue
                trial = presets.with_teacher(trial, record.checkpoint_uri)
            chash = config_lib.config_hash(trial.config)
            record = candidates.get((trial.name, chash))
            if record is None:
                models.append({"trial": trial.name, "how": "trained", "config_hash": chash})
                continue
            # this night gets MLflow runs of its own: the lent record keeps only the model (and its version)
            records.save_record(
                str(folder),
                dataclasses.replace(
                    record, evaluated=False, mlflow_run_id=None, mlflow_parent_run_id=None, tracking=None
                ),
            )
            models.append({"trial": trial.name, "how": f"reused from {record['nightly_origin']}", "config_hash": chash})
    return models
