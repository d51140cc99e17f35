"""Evaluate one cell: (model checkpoint [+ variant]) x attack x eps x seed -> CellResult + one row
(:func:`make_row`), and back (:func:`row_to_result`).

A cell is content-addressed: its id hashes the checkpoint's bytes (SHA-256), the attack spec, the
evaluation settings that change the number, the inference variant and the seed -- so a rerun finds
the finished cell and never adds a second row for it, whatever the sweep is called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sors import attacks, defenses, evaluation
from sors import config as config_lib
from sors import data as data_lib
from sors import train as train_lib
from sors.config import AttackConfig, EvalConfig, RunConfig
from sors.models.factory import wrap_average
from sors.models.supernet import SuperNet
from tasks import gradients, row_schema, storage
from tasks.row_schema import SCHEMA_VERSION


@dataclass(frozen=True)
class CellSpec:
    """Everything one evaluation cell needs; the first block is hashed into :attr:`cell_id`."""

    checkpoint_uri: str
    checkpoint_sha256: str
    dataset: str
    attack: AttackConfig
    eval: EvalConfig
    seed: int = 0
    average_paths: int = 1  # RS*/SORS*: softmax of this many paths averaged per forward
    source_uri: str | None = None  # transfer cells: the checkpoint crafted on (None: the undefended target)
    source_sha256: str | None = None
    # context: stored in the row, not part of the identity
    sweep: str = ""
    trial: str = ""
    variant: str = ""
    model_label: str = ""
    role: str = "main"  # "sanity": an extra cell for the cross-cell checks, not a table column
    source_label: str = ""  # the source model's row name (Table 1, Table 5)
    mlflow_run_id: str | None = None
    code_version: str = ""
    data_root: str | None = None

    def identity(self) -> dict:
        """What determines the cell's result (and so its id)."""
        attack = {
            "name": self.attack.name,
            "eps": round(float(self.attack.eps), 8),
            "steps": self.attack.steps,
            "eot_samples": self.attack.eot_samples,
        }
        evaluation = {
            "repeats": self.eval.repeats,
            "n_examples": self.eval.n_examples,
            "all_paths": self.eval.all_paths,
            "exact_paths_max": self.eval.exact_paths_max,
        }
        # keys added later enter the identity only when set, so every earlier cell keeps its id
        if self.attack.random_start is not None:
            attack["random_start"] = bool(self.attack.random_start)
        if self.source_sha256:
            attack["source_sha256"] = self.source_sha256
        if self.eval.defense != "none":
            evaluation["defense"] = {"name": self.eval.defense, **config_lib.defense_options(self.eval)}
        return {
            "checkpoint_sha256": self.checkpoint_sha256,
            "attack": attack,
            "eval": evaluation,
            "average_paths": self.average_paths,
            "seed": self.seed,
        }

    @property
    def cell_id(self) -> str:
        """24 hex digits of SHA-256 over :meth:`identity` (stable across runs and machines)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:24]


def load_model(spec: CellSpec, device="cpu"):
    """``(model in eval mode, training config)`` for a cell: the checkpoint, wrapped for its variant."""
    path = storage.local_copy(spec.checkpoint_uri)
    model, cfg, _ = train_lib.load_checkpoint(path, device=device)
    return wrap_average(model, spec.average_paths).eval(), cfg


def load_source(spec: CellSpec, device="cpu"):
    """The transfer source of a cell (eval mode, frozen), or None when the cell names none."""
    if not spec.source_uri:
        return None
    source, _, _ = train_lib.load_checkpoint(storage.local_copy(spec.source_uri), device=device)
    return source.eval()


def defended(model, eval_cfg: EvalConfig):
    """``model`` behind the configured input-transform defense (BPDA for non-differentiable ones), or
    ``model`` itself for ``eval.defense=none``."""
    if eval_cfg.defense == "none":
        return model
    return defenses.build(eval_cfg.defense, model, bpda=True, **config_lib.defense_options(eval_cfg))


def test_images(spec: CellSpec, cfg: RunConfig):
    """The cell's test images (N, C, H, W) in [0, 1], labels (N,) and their indices in the test split
    (N,): ``eval.n_examples`` of the test split."""
    root = spec.data_root or cfg.data.root
    return data_lib.load_indexed(cfg.data.name, "test", root, n=spec.eval.n_examples, seed=cfg.data.seed)


def n_ops_of(model, cfg: RunConfig) -> int | None:
    """Candidates per choice layer (the configured m, else the model's own), None for plain models."""
    inner = getattr(model, "supernet", model)
    if not isinstance(inner, SuperNet):
        return None
    return cfg.model.n_ops or max(inner.choice_counts)


def evaluate(spec: CellSpec, device="cpu"):
    """Run one cell. Returns ``(CellResult, row)``; ``row`` follows the Parquet schema in README's results section."""
    model, cfg = load_model(spec, device)
    images, labels, index = test_images(spec, cfg)
    eval_cfg = dataclasses.replace(spec.eval, seed=spec.seed)
    num_classes = data_lib.spec(cfg.data.name).num_classes
    transfer = attacks.info(spec.attack.name)["transfer"] if spec.attack.name in attacks.available() else False
    # gray-box (Table 7): with no source named, a transfer cell crafts on the undefended model itself
    source = load_source(spec, device) if transfer else None
    if transfer and source is None:
        source = model
    target = defended(model, spec.eval)
    options = {"random_start": spec.attack.random_start} if spec.attack.random_start is not None else {}
    if transfer:
        options["source_name"] = spec.source_label or ("undefended target" if spec.source_uri is None else "source")
    start = time.perf_counter()
    result = evaluation.evaluate_cell(
        target,
        images,
        labels,
        spec.attack,
        eval_cfg,
        seed=spec.seed,
        source_model=source,
        device=device,
        num_classes=num_classes,
        attack_options=options,
        dataset=cfg.data.name,
        example_index=index,
    )
    result.extra["role"] = spec.role
    if spec.eval.defense != "none":
        result.extra["defense"] = {"name": spec.eval.defense, **config_lib.defense_options(spec.eval)}
    if transfer:
        result.extra["source"] = spec.source_label or "undefended target"
        result.extra["source_grad_orthogonality"] = gradients.cross_orthogonality(source, model, images, labels)
    seconds = getattr(result, "seconds", None) or time.perf_counter() - start
    return result, make_row(spec, cfg, result, n_ops_of(model, cfg), seconds)


def context_of(spec: CellSpec) -> dict:
    """The row fields that say who asked for a cell (sweep, trial, row name, role, MLflow run), not what it
    measured: a cell another sweep already stored (same checkpoint, attack and protocol, so the same id) is
    shown to this one with this context."""
    return {
        "sweep": spec.sweep,
        "trial": spec.trial,
        "variant": spec.variant or spec.trial,
        "model": spec.model_label or spec.variant or spec.trial,
        "role": spec.role,
        "mlflow_run_id": spec.mlflow_run_id,
    }


def make_row(spec: CellSpec, cfg: RunConfig, result, n_ops: int | None, seconds: float) -> dict:
    """One Parquet row (plain Python values, the columns of :data:`tasks.row_schema.COLUMNS`) from a cell's
    spec, its checkpoint config and its result."""
    row = {
        **row_schema.result_values(result),
        "cell_id": spec.cell_id,
        "schema_version": SCHEMA_VERSION,
        **context_of(spec),
        "arch": cfg.model.name,
        "dataset": cfg.data.name,
        "lambda": float(cfg.train.lambda_),
        "n_ops": n_ops,
        "paths_per_step": int(cfg.train.paths_per_step),
        "average_paths": int(spec.average_paths),
        "attack": spec.attack.name,
        "eps": float(spec.attack.eps),
        "seed": int(spec.seed),
        "seconds": float(seconds),
        "checkpoint_uri": spec.checkpoint_uri,
        "checkpoint_sha256": spec.checkpoint_sha256,
        "config_hash": config_lib.config_hash(cfg),
        "code_version": spec.code_version,
        "created_at": datetime.now(timezone.utc),
    }
    return row_schema.check_complete(row)


def row_to_result(row: dict, result_cls=evaluation.CellResult):
    """Rebuild a ``CellResult`` (or ``result_cls``) from a stored row: the inverse of :func:`make_row`,
    for the cross-cell checks and the tables."""
    values = row_schema.result_fields(row)
    if dataclasses.is_dataclass(result_cls):
        names = {f.name for f in dataclasses.fields(result_cls)}
        values = {k: v for k, v in values.items() if k in names}
    return result_cls(**values)
