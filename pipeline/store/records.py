"""Model records: one JSON file per trained (or evaluated) model, ``<results>/models/<sweep>/<trial>.json``.

A record holds what a model's MLflow run should show (config, per-epoch history, checkpoint URI and
SHA-256, run id, tracking status); the sweep writes it, ``sors sync`` and the nightly read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record_path(results_dir: str, sweep: str, trial: str) -> Path:
    """Where a trained model's record lives."""
    return Path(results_dir) / "models" / sweep / f"{trial}.json"


def load_record(results_dir: str, sweep: str, trial: str) -> dict | None:
    """The model record of a trial, or None when it has not finished training."""
    path = record_path(results_dir, sweep, trial)
    return json.loads(path.read_text()) if path.is_file() else None


def save_record(results_dir: str, record: dict) -> Path:
    """Write a model record atomically."""
    path = record_path(results_dir, record["sweep"], record["trial"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)
    return path


def load_records(results_dir: str, sweep: str) -> list[dict]:
    """Every model record of a sweep."""
    folder = Path(results_dir) / "models" / sweep
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def all_records(results_dir: str | Path, sweep: str | None = None) -> list[dict]:
    """Every model record under ``results_dir`` (of one sweep, or of every sweep)."""
    root = Path(results_dir) / "models"
    sweeps = [sweep] if sweep else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [r for name in sweeps for r in load_records(str(results_dir), name)]


def find_trained(results_dir: str | Path, config_hash: str, code_version: str, checkpoint_exists) -> dict | None:
    """A model record of any sweep under ``results_dir`` trained from the same resolved config by the same
    code (``config_hash``, ``code_version``) whose checkpoint ``checkpoint_exists(uri)`` still, else None.
    A record lent from another sweep (``reused_from``) is skipped: its origin is found directly."""
    for record in all_records(results_dir):
        if (
            record.get("config_hash") == config_hash
            and record.get("code_version") == code_version
            and not record.get("reused_from")
            and checkpoint_exists(record.get("checkpoint_uri") or "")
        ):
            return record
    return None
