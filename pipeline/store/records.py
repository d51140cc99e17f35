"""Model records: one JSON file per trained (or evaluated) model, ``<results>/models/<sweep>/<trial>.json``.

A record holds what a model's MLflow run should show (config, per-epoch history, checkpoint URI and
SHA-256, run id, tracking status); the sweep writes it, ``sors sync`` and the nightly read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class ModelRecord:
    """What the results folder knows of one trained (or evaluated) model. Written by the sweep's trainable
    (a trained model), by model lending and the nightly (a reused one) and by ``sors evaluate`` (a given
    checkpoint); read by the sweep, ``sors sync``, reports and the nightly. :meth:`from_dict` reads every
    record written so far (a missing key takes its default; a key this version does not know is kept in
    ``extra`` and written back), :meth:`to_dict` is what the JSON file holds.

    A mapping view (``record["sweep"]``, ``record.get(...)``, ``dict(record, ...)``) is kept for code that
    treats records as the dicts they used to be; new code uses the attributes."""

    sweep: str
    trial: str
    checkpoint_uri: str = ""
    checkpoint_sha256: str = ""
    label: str = ""
    variants: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # sors.config.to_dict of the resolved run config
    config_hash: str = ""
    run_name: str | None = None  # the Ray Train run (its checkpoint folder under the storage path)
    train_node_id: str | None = None  # the Ray node of training rank 0
    epochs: int | None = None
    history: list[dict] = field(default_factory=list)  # per-epoch metrics
    grad_cosines: list[float] = field(default_factory=list)
    grad_mean_abs_cos: float | None = None
    code_version: str = ""
    created_at: str | None = None  # ISO 8601, UTC
    evaluated: bool = False  # every cell of the model is stored
    cells: dict | None = None  # {cell id: context} of the cells this record's sweep asked for
    mlflow_run_id: str | None = None
    mlflow_parent_run_id: str | None = None
    tracking: dict | None = None  # {"status": "complete" | "incomplete", "at", "error", "uri"}
    registered_model: dict | None = None  # {"name", "version"} in the MLflow model registry
    reused_from: str | None = None  # "sweep/trial" a lent model was trained by
    nightly_origin: str | None = None  # the nightly run that trained a reused model
    extra: dict = field(default_factory=dict)  # keys a later version wrote; kept as they were

    @classmethod
    def from_dict(cls, data: dict) -> "ModelRecord":
        """A record from its JSON form (any version); unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in names and k != "extra"}}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        """The JSON form: every field, ``extra``'s keys at the top level as they were read."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    # the mapping view
    def __getitem__(self, key: str) -> Any:
        data = self.to_dict()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in {f.name for f in dataclasses.fields(self)} - {"extra"}:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self):
        return self.to_dict().keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def __bool__(self) -> bool:
        return True


def record_path(results_dir: str, sweep: str, trial: str) -> Path:
    """Where a trained model's record lives."""
    return Path(results_dir) / "models" / sweep / f"{trial}.json"


def read_record(path: Path) -> ModelRecord:
    """The one reader: a record file (of any version) as a :class:`ModelRecord`."""
    return ModelRecord.from_dict(json.loads(path.read_text()))


def load_record(results_dir: str, sweep: str, trial: str) -> ModelRecord | None:
    """The model record of a trial, or None when it has not finished training."""
    path = record_path(results_dir, sweep, trial)
    return read_record(path) if path.is_file() else None


def save_record(results_dir: str, record: ModelRecord | dict) -> Path:
    """The one writer: a model record, atomically (a dict is read as a record first)."""
    if not isinstance(record, ModelRecord):
        record = ModelRecord.from_dict(dict(record))
    path = record_path(results_dir, record.sweep, record.trial)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=1, default=str))
    os.replace(tmp, path)
    return path


def load_records(results_dir: str, sweep: str) -> list[ModelRecord]:
    """Every model record of a sweep."""
    folder = Path(results_dir) / "models" / sweep
    return [read_record(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def all_records(results_dir: str | Path, sweep: str | None = None) -> list[ModelRecord]:
    """Every model record under ``results_dir`` (of one sweep, or of every sweep)."""
    root = Path(results_dir) / "models"
    sweeps = [sweep] if sweep else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [r for name in sweeps for r in load_records(str(results_dir), name)]


def find_trained(results_dir: str | Path, config_hash: str, code_version: str, checkpoint_exists) -> ModelRecord | None:
    """A model record of any sweep under ``results_dir`` trained from the same resolved config by the same
    code (``config_hash``, ``code_version``) whose checkpoint ``checkpoint_exists(uri)`` still, else None.
    A record lent from another sweep (``reused_from``) is skipped: its origin is found directly."""
    for record in all_records(results_dir):
        if (
            record.config_hash == config_hash
            and record.code_version == code_version
            and not record.reused_from
            and checkpoint_exists(record.checkpoint_uri or "")
        ):
            return record
    return None
