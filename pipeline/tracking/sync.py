"""MLflow as the system of record, even when the tracking server was down: ``sors sync``.

The results folder is written first and MLflow second. A trained model's record
(``<results>/models/<sweep>/<trial>.json``: config, per-epoch history, checkpoint, hashes) and its
Parquet cells hold everything its MLflow run should show, so :func:`track` can (re)build the run
from them at any time, logging only what the run does not have yet:

- the run itself (params = the resolved config, secrets redacted; tags), nested under its sweep's
  (or nightly night's) parent run, found by parent, trial name and config hash or created -- never a
  run that holds another checkpoint -- and its id written back into the record and the cells' rows;
- per-epoch training metrics (step = epoch), the gradient probe, evaluation metrics (step 0), each
  logged when the run lacks that value at that step (a changed value is logged again);
- the data splits as run inputs; artifacts: the sors checkpoint and the cell files, uploaded when
  their SHA-256 is not in the run's manifest; the report on the parent run; the model as a registered
  version (:mod:`pipeline.tracking.model_registry`), or -- for a model an earlier nightly trained and this one reuses
  -- a tag naming that version; the run's final status.

A sweep trial calls :func:`track` itself when its evaluation is done. When MLflow cannot be reached
the trial still finishes (checkpoint and Parquet are on disk), the record is marked
``tracking.status = "incomplete"``, the CLI says so, and ``sors sync`` -- the same function --
backfills the runs once the server is back. Running it twice logs nothing the second time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline import preflight
from pipeline.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, OneLineArgumentParser, tracking_line
from pipeline.redact import redact
from pipeline.store import records, results
from pipeline.tracking import model_registry
from pipeline.tracking import runs as tracking
from sors import config as config_lib
from sors import train as train_lib
from sors.train import CheckpointError
from tasks import storage

log = logging.getLogger("pipeline.tracking.sync")
COMPLETE, INCOMPLETE = "complete", "incomplete"
EPOCH_KEYS = {k: ("epoch_seconds" if k == "seconds" else k) for k in tracking.EpochLogger.KEYS}


# ---------------------------------------------------------------- record state


def pending(results_dir: str | Path, sweep: str | None = None, unknown: bool = False) -> list[dict]:
    """Model records whose MLflow run is known to be incomplete (``unknown``: also records that
    predate tracking status, which ``sors sync`` checks too)."""

    def needs(record: records.ModelRecord) -> bool:
        status = (record.tracking or {}).get("status")
        return status == INCOMPLETE or (unknown and status != COMPLETE)

    return [r for r in records.all_records(results_dir, sweep) if needs(r)]


def mark(
    results_dir: str | Path, record: records.ModelRecord, status: str, error: str | None = None, uri: str | None = None
) -> None:
    """Write the tracking outcome into the record file (``error``/``uri`` stored redacted)."""
    if status == COMPLETE and (record.tracking or {}).get("status") == COMPLETE:
        return  # nothing new: leave the file as it is
    record.tracking = {"status": status, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if error:
        record.tracking.update(error=redact(error), uri=redact(uri or ""))
    records.save_record(str(results_dir), record)


# ---------------------------------------------------------------- what a run is missing


def _record_rows(results_dir: str | Path, record: records.ModelRecord) -> list[dict]:
    store = Path(results_dir) / "cells"
    own = [
        r
        for r in results.read_rows(store, sweep=record.sweep)
        if r["trial"] == record.trial and r["checkpoint_sha256"] == record.checkpoint_sha256
    ]
    # + the record's cells that another sweep stored first (a model lent by another sweep)
    return own + results.rows_of_records(store, [record], skip={r["cell_id"] for r in own})


def _existing_run(client, run_id: str | None):
    """The run ``run_id`` on this server, or None when it is not there."""
    from mlflow.exceptions import MlflowException  # mlflow: imported only when a run is tracked

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(err, "error_code", "")) + str(err):
            raise
    return None


def sweep_parent(uri: str, experiment_id: str, sweep: str, preset: str | None = None) -> str:
    """The parent run of sweep ``sweep`` (found by name, else created)."""
    tags = {tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: sweep, tracking.TAG_CODE: tracking.code_version()}
    if preset:
        tags[tracking.TAG_PRESET] = preset
    return tracking.parent_run(uri, experiment_id, sweep, f"sweep {sweep}", tags)


def _ensure_run(uri: str, results_dir: str | Path, record: records.ModelRecord, client) -> str:
    """The record's run on this server unless it holds another checkpoint, else the run found or
    created under the record's parent run (the sweep's, created when missing) by trial + config hash."""
    run = _existing_run(client, record.mlflow_run_id)
    if run is not None and run.data.tags.get(tracking.TAG_CHECKPOINT) in (None, record.checkpoint_sha256):
        return run.info.run_id
    experiment = tracking.ensure_experiment(uri, record.sweep, str(Path(results_dir) / "mlartifacts"))
    parent = record.mlflow_parent_run_id
    if _existing_run(client, parent) is None:
        parent = sweep_parent(uri, experiment, record.sweep)
    cfg = config_lib.from_dict(record.config)
    tags = {
        tracking.TAG_SWEEP: record.sweep,
        tracking.TAG_CODE: record.get("code_version", ""),
        "sors.label": record.get("label", record.trial),
    }
    record.mlflow_parent_run_id = parent
    return tracking.find_or_create_run(
        uri,
        experiment,
        record.trial,
        record.config_hash or config_lib.config_hash(cfg),
        config_lib.flat_dict(cfg),
        tags,
        parent_run_id=parent,
        checkpoint_sha256=record.checkpoint_sha256,
    )


def adopt_run(
    results_dir: str | Path, record: records.ModelRecord, run_id: str | None, parent_run_id: str | None
) -> dict:
    """Point the record at the run (and parent) this sweep made for it; a record an earlier nightly
    lent to this one gets this night's run. Unchanged when MLflow gave no run (``run_id`` None)."""
    if run_id and (record.mlflow_run_id, record.mlflow_parent_run_id) != (run_id, parent_run_id):
        record = dataclasses.replace(record, mlflow_run_id=run_id, mlflow_parent_run_id=parent_run_id)
        records.save_record(str(results_dir), record)
    return record


def _link_rows(results_dir: str | Path, record: records.ModelRecord, rows: list[dict], run_id: str) -> list[dict]:
    """Point the record and its cell rows at ``run_id`` (rows rewritten in place: still one per cell)."""
    if record.mlflow_run_id != run_id:
        record.mlflow_run_id = run_id
        records.save_record(str(results_dir), record)
    store = Path(results_dir) / "cells"
    linked = []
    for row in rows:
        if row.get("mlflow_run_id") != run_id:
            row = dict(row, mlflow_run_id=run_id)
            results.write_row(store, row)
        linked.append(row)
    return linked


def _latest_by_step(client, run_id: str, key: str) -> dict[int, float]:
    """``{step: value}`` of a metric's history, the last logged value winning at each step."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def _missing_metrics(client, run, wanted: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of ``wanted`` the run lacks or holds another value for at that step
    (history fetched only for keys it has)."""
    have = run.data.metrics
    values_of: dict[str, dict[int, float]] = {}
    missing: dict[int, dict[str, float]] = {}
    for step, metrics in wanted.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key in have and key not in values_of:
                values_of[key] = _latest_by_step(client, run.info.run_id, key)
            logged = values_of.get(key, {}).get(step)
            if logged is None or not math.isclose(logged, float(value), rel_tol=1e-9, abs_tol=1e-12):
                missing.setdefault(step, {})[key] = value
    return missing


def _epoch_metrics(record: records.ModelRecord) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in record.history or []:
        step = int(row.get("epoch", len(out) + 1))
        out[step] = {name: row[k] for k, name in EPOCH_KEYS.items() if k in row}
    if record.grad_mean_abs_cos is not None:
        out.setdefault(0, {})["final_grad_abs_cos_probe"] = record.grad_mean_abs_cos
    return out


def _registered_version(client, record: records.ModelRecord):
    """The registry version the record names, if this server has it for the record's checkpoint."""
    from mlflow.exceptions import MlflowException

    named = record.registered_model or {}
    if not named.get("name") or not named.get("version"):
        return None
    try:
        version = client.get_model_version(named["name"], str(named["version"]))
    except MlflowException:
        return None
    return version if version.tags.get(model_registry.TAG_CHECKPOINT) == record.checkpoint_sha256 else None


def _track_model(uri: str, results_dir: str | Path, record: records.ModelRecord, client, run, version) -> dict:
    """The checkpoint, data inputs and registered model of a trained record's run. A model another run
    logged (a nightly reusing an earlier night's model) is named by tags, not logged again.
    ``version``: the registry version the record names (:func:`_registered_version`), or None."""
    done = {"artifacts": 0, "model": 0}
    cfg = config_lib.from_dict(record.config)
    reused = version is not None and version.run_id != run.info.run_id
    if not (run.inputs and run.inputs.dataset_inputs):
        tracking.log_datasets(
            uri, run.info.run_id, cfg, {"test": "evaluation"} if reused else {"train": "training", "test": "evaluation"}
        )
    if reused:
        tags = {
            "sors.registered_model": version.name,
            "sors.model_version": str(version.version),
            "sors.model_run_id": version.run_id,
            tracking.TAG_CHECKPOINT: record.checkpoint_sha256,
        }
        for key, value in tags.items():
            if run.data.tags.get(key) != value:
                client.set_tag(run.info.run_id, key, value)
        return done
    local = storage.local_copy(record.checkpoint_uri)
    done["artifacts"] += tracking.upload_changed(uri, run.info.run_id, [local], "checkpoint")
    if version is None:
        train_lib.read_checkpoint(local)  # weights-only: a bad file fails here, with one line
        name, number = model_registry.log_model(
            uri,
            run.info.run_id,
            local,
            cfg,
            model_registry.registered_name(record.sweep, record.trial),
            record.checkpoint_sha256,
        )
        client.set_tag(run.info.run_id, tracking.TAG_CHECKPOINT, record.checkpoint_sha256)
        record.registered_model = {"name": name, "version": number}
        records.save_record(str(results_dir), record)
        done["model"] = 1
    return done


# ---------------------------------------------------------------- the one function both paths use


def track(
    uri: str,
    results_dir: str | Path,
    record: records.ModelRecord,
    rows: list[dict] | None = None,
    status: str | None = "FINISHED",
    report: bool = False,
) -> dict:
    """Bring the record's MLflow run up to date with what is on disk; returns counts of what was logged.

    ``rows``: the record's cell rows (default: read from the store). ``status``: the run's final
    status (None: leave it). ``report``: also upload ``<results>/reports/<sweep>/`` files.
    Raises whatever MLflow raises; :func:`track_or_mark` is the best-effort wrapper.
    """
    client = tracking.client(uri)
    rows = _record_rows(results_dir, record) if rows is None else rows
    run_id = _ensure_run(uri, results_dir, record, client)
    rows = _link_rows(results_dir, record, rows, run_id)
    run = client.get_run(run_id)
    done = {"metrics": 0, "artifacts": 0, "model": 0}
    trained = bool(record.run_name and record.checkpoint_uri)  # trained here (not `sors evaluate`)
    version = _registered_version(client, record) if trained else None
    # a reused model's training curve is on the run that trained it; this run gets its own evaluation
    wanted = _epoch_metrics(record) if trained and (version is None or version.run_id == run_id) else {}
    wanted.setdefault(0, {}).update(tracking.eval_metrics(rows))
    for step, metrics in sorted(_missing_metrics(client, run, wanted).items()):
        tracking.log_metrics(uri, run_id, metrics, step=step)
        done["metrics"] += len(metrics)
    store = Path(results_dir) / "cells"
    cell_files = [results.cell_path(store, r["dataset"], r["attack"], r["cell_id"]) for r in rows]
    done["artifacts"] += tracking.upload_changed(uri, run_id, cell_files, "cells")
    if trained:
        model_done = _track_model(uri, results_dir, record, client, run, version)
        done["artifacts"] += model_done["artifacts"]
        done["model"] = model_done["model"]
    if report:
        done["artifacts"] += upload_report(uri, results_dir, record.sweep, record.mlflow_parent_run_id)
    if status and client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status)
    return done


def upload_report(
    uri: str, results_dir: str | Path, sweep: str, parent_run_id: str | None, files: list[Path] | None = None
) -> int:
    """The sweep's report files (default: ``<results>/reports/<sweep>/``) on its parent run, those
    whose content changed. Returns how many were uploaded."""
    if files is None:
        folder = Path(results_dir) / "reports" / sweep
        files = sorted(folder.iterdir()) if folder.is_dir() else []
    if not files or not parent_run_id:
        return 0
    return tracking.upload_changed(uri, parent_run_id, files, "report")


def track_or_mark(
    uri: str,
    results_dir: str | Path,
    record: records.ModelRecord,
    rows: list[dict] | None = None,
    status: str | None = "FINISHED",
    report: bool = False,
) -> dict | None:
    """:func:`track`, recording the outcome in the record; never raises for MLflow trouble.

    Returns what was logged, or None when tracking failed (the record then says ``incomplete``
    with the reason, and ``sors sync`` picks it up)."""
    try:
        done = track(uri, results_dir, record, rows, status, report)
    except Exception as err:  # noqa: BLE001 -- tracking trouble must not lose a finished trial
        log.warning("MLflow tracking of %s/%s failed: %s", record.sweep, record.trial, tracking_line(err))
        mark(results_dir, record, INCOMPLETE, tracking_line(err), uri)
        return None
    mark(results_dir, record, COMPLETE)
    return done


def experiment_or_none(uri: str, name: str, artifact_root: str | None = None) -> str | None:
    """:func:`tracking.ensure_experiment`, or None (with a warning) when MLflow cannot be reached."""
    try:
        return tracking.ensure_experiment(uri, name, artifact_root)
    except Exception as err:  # noqa: BLE001 -- the sweep goes on; its trials' records say what to sync
        log.warning("MLflow unreachable, the sweep continues untracked: %s", tracking_line(err))
        return None


def parent_or_none(uri: str, experiment_id: str | None, sweep: str, preset: str | None = None) -> str | None:
    """:func:`sweep_parent`, or None when there is no experiment or MLflow fails."""
    if experiment_id is None:
        return None
    try:
        return sweep_parent(uri, experiment_id, sweep, preset)
    except Exception as err:  # noqa: BLE001
        log.warning("could not create the MLflow run of sweep %s: %s", sweep, tracking_line(err))
        return None


def run_or_none(
    uri: str,
    experiment_id: str | None,
    trial: str,
    config_hash: str,
    params: dict,
    tags: dict,
    parent_run_id: str | None = None,
    checkpoint_sha256: str | None = None,
) -> str | None:
    """:func:`tracking.find_or_create_run`, or None when there is no experiment or MLflow fails."""
    if experiment_id is None:
        return None
    try:
        return tracking.find_or_create_run(
            uri,
            experiment_id,
            trial,
            config_hash,
            params,
            tags,
            parent_run_id=parent_run_id,
            checkpoint_sha256=checkpoint_sha256,
        )
    except Exception as err:  # noqa: BLE001
        log.warning("could not create the MLflow run of %s: %s", trial, tracking_line(err))
        return None


def end_run(uri: str, run_id: str | None, status: str) -> None:
    """Set a run's final status (FINISHED, FAILED, KILLED) if MLflow answers (best effort)."""
    if run_id:
        try:
            tracking.client(uri).set_terminated(run_id, status)
        except Exception as err:  # noqa: BLE001 -- the sweep's own outcome is what matters
            log.warning("could not mark MLflow run %s %s: %s", run_id, status.lower(), tracking_line(err))


def mark_failed(uri: str, run_id: str | None) -> None:
    """Set a run's status to FAILED if MLflow answers (best effort: the error is what matters)."""
    end_run(uri, run_id, "FAILED")


def failure_message(command: str, records: list[dict], results_dir: str, uri: str, sweep: str | None) -> str:
    """The CLI's one line when runs could not be fully logged: what failed, that nothing is lost, the fix."""
    first = (records[0].get("tracking") or {}).get("error", "unknown error")
    target = f" {sweep}" if sweep else ""
    return (
        f"sors {command}: tracking failed: {len(records)} run(s) not fully logged to MLflow at {redact(uri)} "
        f"({first}); checkpoints and Parquet results are complete in {results_dir} -- once the server is back "
        f"run `sors sync{target} --results-dir {results_dir} --tracking-uri {redact(uri)}`"
    )


# ---------------------------------------------------------------- `sors sync`


def build_parser():
    """``sors sync [SWEEP] --results-dir DIR --tracking-uri URI [--all]``."""
    parser = OneLineArgumentParser(
        prog="sors sync",
        description="backfill MLflow runs from the results folder "
        "(after the tracking server was unreachable during a sweep)",
    )
    parser.add_argument("sweep", nargs="?", help="only this sweep (default: every sweep in the results folder)")
    parser.add_argument("--results-dir", default="results", help="results folder (default ./results)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<results>/mlflow.db)",
    )
    parser.add_argument("--all", action="store_true", help="check every run, not only those marked incomplete")
    return parser


def run(args) -> int:
    """Sync every pending record; prints one line per run. Returns 0, or 1 when some run still failed."""
    results_dir = str(Path(args.results_dir).resolve())
    if not (Path(results_dir) / "models").is_dir():
        raise preflight.PreflightError(f"--results-dir {results_dir}: no trained models here (no models/ folder)")
    uri = args.tracking_uri or tracking.default_tracking_uri(results_dir)
    preflight.check_tracking(uri, results_dir)
    preflight.check_store(Path(results_dir) / "cells")
    todo = records.all_records(results_dir, args.sweep) if args.all else pending(results_dir, args.sweep, unknown=True)
    failed = 0
    for record in todo:
        start = time.perf_counter()
        status = "FINISHED" if record.evaluated else None
        done = track_or_mark(uri, results_dir, record, status=status, report=True)
        name = f"{record['sweep']}/{record['trial']}"
        if done is None:
            failed += 1
            print(f"{name}: still failing: {record['tracking']['error']}", file=sys.stderr)
        else:
            print(
                f"{name}: run {record['mlflow_run_id']}: logged {done['metrics']} metric(s), "
                f"{done['artifacts']} artifact(s){', the model' if done['model'] else ''} "
                f"({time.perf_counter() - start:.1f} s)"
            )
    print(f"sors sync: {len(todo) - failed} of {len(todo)} run(s) up to date in MLflow at {redact(uri)}")
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``sors sync ...``; exit 0 synced (or nothing to do), 1 some run still failing, 2 bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code == 0 else EXIT_BAD_INPUT
    try:
        return run(args)
    except (preflight.PreflightError, results.ResultsError, CheckpointError) as err:
        print(f"sors sync: error: {redact(str(err).splitlines()[0])}", file=sys.stderr)
        return EXIT_BAD_INPUT
