"""The sweep's Tune function trainable: one trial trains its model with a ``TorchTrainer`` (resuming from
its latest epoch checkpoint), writes the model record, then fans its evaluation cells out as Ray tasks and
logs them to MLflow. :class:`SweepOptions` is what travels from the driver to every trial."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ray import tune

from pipeline.cluster import fanout, trainer
from pipeline.errors import SweepError
from pipeline.plan import presets
from pipeline.plan.cell_specs import cell_specs, source_records
from pipeline.plan.presets import TrialSpec
from pipeline.store import results
from pipeline.store.records import ModelRecord, load_record, save_record
from pipeline.tracking import runs as tracking
from pipeline.tracking import sync
from sors import config as config_lib
from sors import train as train_lib
from tasks import gradients, storage


@dataclass(frozen=True)
class SweepOptions:
    """Where things go: results folder, checkpoint storage, MLflow; plus behaviour switches."""

    results_dir: str = "results"
    storage_path: str | None = None  # default <results>/ray
    tracking_uri: str | None = None  # default sqlite:///<results>/mlflow.db (or MLFLOW_TRACKING_URI)
    data_root: str | None = None
    resume: bool = False
    progress: bool = True
    max_failures: int = 1
    max_concurrent_trials: int | None = None  # None: what the cluster can hold, autoscaling included
    parent_run_id: str | None = None  # the MLflow run trial runs nest under (default: the sweep's own)

    def resolved(self) -> "SweepOptions":
        """Absolute paths and concrete defaults (what travels to the trials)."""
        results_dir = str(Path(self.results_dir).resolve())
        storage_path = self.storage_path or trainer.default_storage(results_dir)
        if not storage.is_remote(storage_path):
            storage_path = str(Path(storage_path).resolve())
        return dataclasses.replace(
            self,
            results_dir=results_dir,
            storage_path=storage_path,
            tracking_uri=self.tracking_uri or tracking.default_tracking_uri(results_dir),
        )

    @property
    def store(self) -> str:
        return str(Path(self.results_dir) / "cells")

    @property
    def artifact_root(self) -> str:
        return str(Path(self.results_dir) / "mlartifacts")


def train_trial(trial: TrialSpec, ctx: dict, run_id: str) -> dict:
    """Train with Ray Train (resuming from the latest epoch checkpoint if any) and write the model record."""
    from ray.tune.integration.ray_train import TuneReportCallback

    opts = SweepOptions(**ctx["options"])
    name = trainer.run_name(ctx["sweep"], trial.name, trial.config)
    hook = tracking.EpochLogger(opts.tracking_uri, run_id)
    outcome = trainer.train_on_ray(
        trial.config,
        name,
        opts.storage_path,
        epoch_hook=hook,
        max_failures=opts.max_failures,
        callbacks=[TuneReportCallback()],
    )
    local = storage.local_copy(outcome.checkpoint_uri)
    model, cfg, payload = train_lib.load_checkpoint(local)
    grads = gradients.measure(model, cfg.data.name, opts.data_root or cfg.data.root)
    record = ModelRecord(
        sweep=ctx["sweep"],
        trial=trial.name,
        label=trial.label,
        variants=[dataclasses.asdict(v) for v in trial.variants],
        config=config_lib.to_dict(trial.config),
        config_hash=config_lib.config_hash(trial.config),
        run_name=name,
        checkpoint_uri=outcome.checkpoint_uri,
        train_node_id=outcome.metrics.get("node_id"),  # Ray node of training rank 0
        checkpoint_sha256=storage.file_sha256(local),
        mlflow_run_id=run_id,
        epochs=payload.get("epoch"),
        history=payload.get("history", []),
        grad_cosines=grads["cosines"],
        grad_mean_abs_cos=grads["mean_abs_cos"],
        code_version=ctx["code_version"],
        created_at=datetime.now(timezone.utc).isoformat(),
        evaluated=False,
    )
    save_record(opts.results_dir, record)  # MLflow (probe, model, checkpoint) follows in sync.track: it may be down
    return record


def run_trial(params: dict, ctx: dict) -> dict:
    """Tune function trainable: train one model (unless its record exists), then evaluate its cells.

    ``params``: ``{"spec": {"trial": presets.trial_to_dict(...), "run_id": MLflow run}}``; ``ctx``: the
    sweep context, bound with ``tune.with_parameters`` -- it holds the tracking URI, which may carry
    credentials, and Tune writes the param space in plain text (params.json) into every trial folder.
    Reports ``cells_new``/``cells_skipped`` to Tune as cells finish (the driver's progress bars).
    """
    spec = params["spec"]
    trial, run_id = presets.trial_from_dict(spec["trial"]), spec["run_id"]
    opts = SweepOptions(**ctx["options"])
    plan = presets.EvalPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in ctx["evaluation"].items()})
    try:
        record = load_record(opts.results_dir, ctx["sweep"], trial.name)
        if not record or record.config_hash != config_lib.config_hash(trial.config):
            record = train_trial(trial, ctx, run_id)
        record = sync.adopt_run(opts.results_dir, record, run_id, opts.parent_run_id)
        specs = cell_specs(
            trial,
            record,
            plan,
            ctx["sweep"],
            ctx["code_version"],
            opts.data_root,
            source_records(opts.results_dir, ctx["sweep"], plan),
        )
        skipped = sum(results.is_done(opts.store, s) for s in specs)
        new = 0
        tune.report({"cells_new": 0, "cells_skipped": skipped, "cells_total": len(specs)})

        def on_done(row: dict) -> None:
            nonlocal new
            new += 1
            tune.report({"cells_new": new, "cells_skipped": skipped, "cells_total": len(specs)})

        summary = fanout.run_cells(specs, opts.store, use_gpu=trainer.use_gpu(trial.config), on_done=on_done)
        if summary.failures:
            sync.track_or_mark(opts.tracking_uri, opts.results_dir, record, summary.rows, status="FAILED")
            where, why = summary.failures[0]
            raise SweepError(f"{len(summary.failures)} cell(s) of trial {trial.name} failed; first: {where}: {why}")
        record.evaluated = True
        record.cells = results.cell_contexts(specs)
        save_record(opts.results_dir, record)
        # Everything is on disk now; MLflow is logged from it, best effort (a failure marks the record
        # "incomplete" and `sors sync` backfills it later).
        sync.track_or_mark(opts.tracking_uri, opts.results_dir, record, summary.rows)
    except Exception:
        sync.mark_failed(opts.tracking_uri, run_id)
        raise
    return {
        "trial_done": 1,
        "cells_new": new,
        "cells_skipped": skipped,
        "cells_total": len(specs),
        "checkpoint_uri": record.checkpoint_uri,
    }
