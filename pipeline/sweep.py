"""Sweeps: a Ray Tune ``Tuner`` over a function trainable that trains one model with a ``TorchTrainer``,
then fans its evaluation cells out as Ray tasks -- so a model is evaluated as soon as it is trained,
not after the whole grid.

Stages: trials that other trials distil from (``train.teacher: "trial:<name>"``) run in an earlier
Tuner than their students. Everything is idempotent: a trial whose model record and cells exist is
not run again; a trial whose training was interrupted resumes from its latest epoch checkpoint (the
Ray Train run name is deterministic); cells already in the Parquet store are skipped. ``resume=True``
also restores the interrupted Tune experiment itself (``Tuner.restore``).

Results folder layout::

    <results>/cells/dataset=*/attack=*/<cell_id>.parquet   evaluation rows (pipeline.store.results)
    <results>/models/<sweep>/<trial>.json                   model records: checkpoint, hashes, run id
    <results>/ray/                                          Ray Train checkpoints + Tune state (default storage_path)
    <results>/reports/<sweep>/                              tables and plots (pipeline.report)
    <results>/mlflow.db, <results>/mlartifacts/             default MLflow store
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune

from pipeline.cliutil import original_error, root_cause
from pipeline.cluster import connection as cluster
from pipeline.cluster import trainer
from pipeline.cluster.trainable import SweepOptions, run_trial
from pipeline.errors import SweepError, SweepInterrupted
from pipeline.plan import presets
from pipeline.plan.cell_specs import cell_specs, source_records
from pipeline.plan.presets import Sweep, TrialSpec
from pipeline.store import results
from pipeline.store.records import find_trained, load_record, save_record
from pipeline.tracking import runs as tracking
from pipeline.tracking import sync
from sors import config as config_lib
from sors import data as data_lib
from sors import train as train_lib
from sors.errors import ConfigError, DataNotFoundError, TrainingDiverged
from tasks import storage

log = logging.getLogger("pipeline.sweep")
# Errors whose own one-line message says what to fix: shown as they are when a trial raises one.
USER_ERRORS = (ConfigError, DataNotFoundError, TrainingDiverged, train_lib.CheckpointError)


@dataclass
class SweepSummary:
    """What a sweep did (counts are of this invocation) and the rows it covers."""

    sweep: str
    trials_run: int = 0
    trials_skipped: int = 0
    cells_submitted: int = 0
    rows: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    parent_run_id: str | None = None  # the sweep's MLflow parent run (None: MLflow was unreachable)


# ---------------------------------------------------------------- cells


def trial_complete(opts: SweepOptions, sweep: Sweep, trial: TrialSpec) -> bool:
    """True when the trial's model is trained, its cells are all stored and its run has them."""
    record = load_record(opts.results_dir, sweep.name, trial.name)
    if not record or record.config_hash != config_lib.config_hash(trial.config) or not record.evaluated:
        return False
    sources = source_records(opts.results_dir, sweep.name, sweep.evaluation)
    if len(sources) < len(sweep.evaluation.source_trials()):
        return False
    return all(
        results.is_done(opts.store, s) for s in cell_specs(trial, record, sweep.evaluation, sweep.name, sources=sources)
    )


# ---------------------------------------------------------------- the trial (runs in a Tune trial actor)


# ---------------------------------------------------------------- the driver


class _Bars:
    """tqdm bars on the driver: epochs trained and evaluation cells finished, over all trials."""

    def __init__(self, epochs_total: int, cells_total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.epochs = tqdm(
            total=epochs_total, desc="epochs", unit="epoch", disable=not enabled or not epochs_total, dynamic_ncols=True
        )
        self.cells = tqdm(total=cells_total, desc="cells ", unit="cell", disable=not enabled, dynamic_ncols=True)
        self.seen_epochs: dict[str, int] = {}
        self.seen_cells: dict[str, int] = {}

    def close(self):
        self.epochs.close()
        self.cells.close()


_ACTIVE_BARS: dict[str, _Bars] = {}  # kept out of the callback: Tune pickles callbacks into its state


class _Progress(tune.Callback):
    """Feeds the driver's :class:`_Bars` from trial results (epochs from Ray Train, cells from the trial)."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        bars = _ACTIVE_BARS.get("sweep")
        if bars is None:
            return
        key = trial.trial_id
        if "cells_total" in result:
            done = int(result.get("cells_new", 0)) + int(result.get("cells_skipped", 0))
            bars.cells.update(max(0, done - bars.seen_cells.get(key, 0)))
            bars.seen_cells[key] = max(done, bars.seen_cells.get(key, 0))
        elif "epoch" in result:
            epoch = int(result["epoch"])
            bars.epochs.update(max(0, epoch - bars.seen_epochs.get(key, 0)))
            bars.seen_epochs[key] = max(epoch, bars.seen_epochs.get(key, 0))


def _cost(trial: TrialSpec) -> float:
    """Rough relative training cost, to start the slowest trials first (shorter wall time)."""
    cfg = trial.config
    factor = 1.0
    if config_lib.is_super_network(cfg.model.name):
        factor = cfg.train.paths_per_step * (2.0 if cfg.train.lambda_ > 0 else 1.0)
    elif cfg.model.members:
        factor = len(str(cfg.model.members).replace("*", ",").split(","))  # rough member count
        if "*" in str(cfg.model.members):
            factor = int(str(cfg.model.members).split("*")[1])
    return (cfg.train.epochs or 0) * (cfg.data.n_train or 60000) * factor


def _context(sweep: Sweep, opts: SweepOptions, code_version: str) -> dict:
    return {
        "sweep": sweep.name,
        "preset": sweep.preset,
        "code_version": code_version,
        "options": dataclasses.asdict(opts),
        "evaluation": {
            "clean": sweep.evaluation.clean,
            "attacks": [dict(a) for a in sweep.evaluation.attacks],
            "eps": list(sweep.evaluation.eps),
            "seeds": list(sweep.evaluation.seeds),
            "sanity": sweep.evaluation.sanity,
        },
    }


def _resolve_teachers(stage: list[TrialSpec], opts: SweepOptions, sweep: Sweep) -> list[TrialSpec]:
    resolved = []
    for trial in stage:
        teacher = trial.teacher_trial
        if teacher:
            record = load_record(opts.results_dir, sweep.name, teacher)
            if not record:
                raise SweepError(f"trial {trial.name}: teacher {teacher} has no trained model")
            trial = presets.with_teacher(trial, record.checkpoint_uri)
        resolved.append(trial)
    return resolved


def _check_data(sweep: Sweep, opts: SweepOptions) -> None:
    """Fail before launching anything when a data set is missing (DataNotFoundError, one line)."""
    for name, root in {(t.config.data.name, opts.data_root or t.config.data.root) for t in sweep.trials}:
        data_lib.load(name, "test", root, n=1)


def lend_trained_models(stage: list[TrialSpec], sweep: Sweep, opts: SweepOptions, code_version: str) -> list[str]:
    """Give each trial of ``stage`` that has no model yet the model another sweep of the same results folder
    trained from the same resolved config with the same code, so it is evaluated, not trained again (a
    shared teacher, the same SORS in several paper tables). Returns "trial <- sweep/trial" per loan."""
    loans = []
    for trial in stage:
        chash = config_lib.config_hash(trial.config)
        own = load_record(opts.results_dir, sweep.name, trial.name)
        if own and own.config_hash == chash:
            continue
        origin = find_trained(opts.results_dir, chash, code_version, storage.checkpoint_exists)
        if origin is None:
            continue
        # the loan gets this sweep's MLflow run and cells; it keeps the checkpoint and its history
        save_record(
            opts.results_dir,
            dataclasses.replace(
                origin,
                sweep=sweep.name,
                trial=trial.name,
                label=trial.label,
                variants=[dataclasses.asdict(v) for v in trial.variants],
                evaluated=False,
                cells=None,
                mlflow_run_id=None,
                mlflow_parent_run_id=None,
                tracking=None,
                reused_from=f"{origin.sweep}/{origin.trial}",
            ),
        )
        loans.append(f"{trial.name} <- {origin.sweep}/{origin.trial}")
    return loans


def _run_stage(
    k: int,
    stage: list[TrialSpec],
    sweep: Sweep,
    opts: SweepOptions,
    ctx: dict,
    experiment_id: str,
    summary: SweepSummary,
) -> None:
    for loan in lend_trained_models(stage, sweep, opts, ctx["code_version"]):
        log.warning("sweep %s: %s (same config and code: its model is evaluated, not retrained)", sweep.name, loan)
    todo = [t for t in stage if not trial_complete(opts, sweep, t)]
    summary.trials_skipped += len(stage) - len(todo)
    if not todo:
        return
    todo.sort(key=_cost, reverse=True)
    grid = []
    for trial in todo:
        params = config_lib.flat_dict(trial.config)
        tags = {
            tracking.TAG_SWEEP: sweep.name,
            tracking.TAG_PRESET: sweep.preset,
            tracking.TAG_CODE: ctx["code_version"],
            "sors.label": trial.label,
        }
        record = load_record(opts.results_dir, sweep.name, trial.name)
        same_config = record is not None and record.config_hash == config_lib.config_hash(trial.config)
        trained = record.checkpoint_sha256 if same_config else None
        run_id = sync.run_or_none(
            opts.tracking_uri,
            experiment_id,
            trial.name,  # None: MLflow down, sync later
            config_lib.config_hash(trial.config),
            params,
            tags,
            opts.parent_run_id,
            trained,
        )
        grid.append({"trial": presets.trial_to_dict(trial), "run_id": run_id})
    needs_training = [t for t in todo if not load_record(opts.results_dir, sweep.name, t.name)]

    def n_cells(t: TrialSpec) -> int:
        cells = sweep.evaluation.cells(presets.is_randomized_arch(t.config.model.name))
        return len(cells) * len(sweep.evaluation.seeds) * len(t.evaluated())

    bars = _ACTIVE_BARS["sweep"] = _Bars(
        sum(t.config.train.epochs or 0 for t in needs_training), sum(n_cells(t) for t in todo), opts.progress
    )
    gpu = any(trainer.use_gpu(t.config) for t in todo)
    shortage = (
        cluster.shortage(max(t.config.train.num_workers for t in needs_training), gpu) if needs_training else None
    )
    if shortage:
        log.warning("sweep %s: %s", sweep.name, shortage)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), cluster.trial_resources())
    experiment = f"{sweep.name}-stage{k}"
    path = f"{opts.storage_path.rstrip('/')}/{experiment}"
    try:
        tuner = _restore(path, trainable) if opts.resume else None
        if tuner is None:
            tuner = tune.Tuner(
                trainable,
                param_space={"spec": tune.grid_search(grid)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=cluster.max_concurrent_trials(
                        max(t.config.train.num_workers for t in todo), gpu, len(todo), opts.max_concurrent_trials
                    ),
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=experiment,
                    storage_path=opts.storage_path,
                    verbose=0,
                    callbacks=[_Progress()],
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        grid_result = tuner.fit()
    finally:
        _ACTIVE_BARS.pop("sweep", None)
        bars.close()
    summary.trials_run += len(todo)
    errors = [(r.config.get("spec", {}).get("trial", {}).get("name", "?"), r.error) for r in grid_result if r.error]
    if errors:
        name, error = errors[0]
        cause = original_error(error)
        why = (
            " ".join(str(cause).split())[:400]
            if isinstance(cause, USER_ERRORS) and str(cause).strip()
            else root_cause(error)
        )
        raise SweepError(f"trial {name} failed: {why}", cause=cause)
    unfinished = [t.name for t in todo if not trial_complete(opts, sweep, t)]
    if unfinished:
        raise SweepInterrupted(f"sweep {sweep.name} stopped before {', '.join(unfinished)} finished")


def _restore(path: str, trainable) -> tune.Tuner | None:
    """The interrupted Tune experiment at ``path``, or None when there is none (or it cannot be read:
    then a fresh Tuner continues, reusing every finished model, epoch checkpoint and cell)."""
    try:
        if not tune.Tuner.can_restore(path):
            return None
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    except Exception as err:  # noqa: BLE001 -- unreadable state must not block the resume
        log.warning("could not restore the Tune state at %s (%s); continuing with a fresh Tuner", path, root_cause(err))
        return None


def _trial_name(trial) -> str:
    return trial.config["spec"]["trial"]["name"]


def run_sweep(sweep: Sweep, opts: SweepOptions) -> SweepSummary:
    """Train and evaluate every trial of ``sweep`` (Ray must be connected). Returns the rows."""
    start = time.perf_counter()
    opts = opts.resolved()
    Path(opts.results_dir).mkdir(parents=True, exist_ok=True)
    _check_data(sweep, opts)
    code_version = tracking.code_version()
    experiment_id = sync.experiment_or_none(opts.tracking_uri, sweep.name, opts.artifact_root)
    owns_parent = not opts.parent_run_id  # a nightly passes its night's run and ends it itself
    if owns_parent:
        opts = dataclasses.replace(
            opts, parent_run_id=sync.parent_or_none(opts.tracking_uri, experiment_id, sweep.name, sweep.preset)
        )
    ctx = _context(sweep, opts, code_version)
    summary = SweepSummary(sweep=sweep.name, parent_run_id=opts.parent_run_id)
    results.remove_stale_temporaries(opts.store)  # what writers killed in an earlier run left behind
    before = {p.name for p in results.files(opts.store)}
    try:
        for k, stage in enumerate(presets.stages(sweep.trials, sweep.evaluation.source_trials())):
            _run_stage(k, _resolve_teachers(stage, opts, sweep), sweep, opts, ctx, experiment_id, summary)
    except BaseException as err:
        if owns_parent:
            sync.end_run(
                opts.tracking_uri,
                opts.parent_run_id,
                "KILLED" if isinstance(err, (KeyboardInterrupt, SweepInterrupted)) else "FAILED",
            )
        raise
    if owns_parent:
        sync.end_run(opts.tracking_uri, opts.parent_run_id, "FINISHED")
    summary.cells_submitted = len({p.name for p in results.files(opts.store)} - before)
    summary.records = [load_record(opts.results_dir, sweep.name, t.name) for t in sweep.trials]
    sources = source_records(opts.results_dir, sweep.name, sweep.evaluation)
    wanted = [
        s
        for t, r in zip(_resolve_all(sweep, opts), summary.records)
        if r
        for s in cell_specs(t, r, sweep.evaluation, sweep.name, sources=sources)
    ]
    summary.rows = results.rows_for(opts.store, wanted)
    summary.seconds = time.perf_counter() - start
    return summary


def _resolve_all(sweep: Sweep, opts: SweepOptions) -> list[TrialSpec]:
    """Every trial with teacher references resolved (for computing their cell ids)."""
    out = []
    for trial in sweep.trials:
        teacher = trial.teacher_trial
        record = load_record(opts.results_dir, sweep.name, teacher) if teacher else None
        out.append(presets.with_teacher(trial, record.checkpoint_uri) if record else trial)
    return out
