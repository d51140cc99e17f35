"""MLflow tracking: one experiment per sweep, one run per trial.

Params are the trial's whole resolved config (``sors.config.flat_dict``); per-epoch training metrics
are logged from Ray Train's rank 0 (:class:`EpochLogger` travels to the worker); evaluation results
become metrics on the same run (``pgd_eps0.196_acc``); the cell Parquet files, the sors checkpoint,
the report and plots are artifacts; the model is logged with ``mlflow.pytorch.log_model``.

Default store: ``sqlite:///<results>/mlflow.db`` with artifacts under ``<results>/mlartifacts``;
``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` points at a server instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Iterable

from pipeline.redact import redact, redact_mapping

log = logging.getLogger("pipeline.tracking")
# MLflow's HTTP client retries a failing call for about 4 minutes by default; a sweep must not stall that
# long per call while the server is down (what it cannot log, `sors sync` backfills). Users may override.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
TAG_SWEEP, TAG_TRIAL, TAG_HASH, TAG_PRESET, TAG_CODE = ("sors.sweep", "sors.trial", "sors.config_hash",
                                                        "sors.preset", "sors.code_version")


def default_tracking_uri(results_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the results folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def code_version() -> str:
    """The git commit of the code (``-dirty`` when the tree has changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return sha.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return "v" + version("sors-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _retry(call, *args, attempts: int = 5, **kwargs):
    """Run an MLflow call, retrying briefly: SQLite stores answer "database is locked" under concurrent writers."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- MLflow raises several types for transient store errors
            if attempt == attempts - 1 or unreachable(err):  # MLflow's HTTP layer has retried already
                raise
            log.debug("MLflow call failed (%s), retrying", err)
            time.sleep(0.5 * (attempt + 1))


def unreachable(err: BaseException) -> bool:
    """True when ``err`` says the tracking server could not be reached (not worth retrying here)."""
    text = str(err)
    return isinstance(err, ConnectionError) or any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish", "Read timed out"))


def client(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri`` (bounded HTTP retries, see ``HTTP_DEFAULTS``)."""
    from mlflow.tracking import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created when missing (artifacts under ``artifact_root`` for local stores)."""
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if artifact_root and tracking_uri.startswith("sqlite:"):
        location = Path(artifact_root).resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 -- created concurrently by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def find_or_create_run(tracking_uri: str, experiment_id: str, trial: str, config_hash: str, params: dict,
                       tags: dict) -> str:
    """The run of a trial (same trial name and config hash: a resumed sweep reuses it), else a new one
    with ``params`` and ``tags`` logged. Returns the run id."""
    from mlflow.entities import Param, RunTag


    params, tags = redact_mapping(params), redact_mapping(tags)  # no credentials in params or tags
    mlflow_client = client(tracking_uri)
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_TRIAL}` = '{trial}' and tags.`{TAG_HASH}` = '{config_hash}'",
        max_results=1)
    if found:
        return found[0].info.run_id
    all_tags = {TAG_TRIAL: trial, TAG_HASH: config_hash, **tags}
    run = mlflow_client.create_run(experiment_id, run_name=trial, tags=all_tags)
    params = [Param(k, "None" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        mlflow_client.log_batch(run.info.run_id, params=params[start:start + 100])
    mlflow_client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics (None and non-numbers skipped) at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    for start in range(0, len(batch), 1000):
        _retry(client(tracking_uri).log_batch, run_id, metrics=batch[start:start + 1000])


class EpochLogger:
    """Picklable per-epoch metric logger that Ray Train's rank 0 calls as ``logger(epoch, row)``."""

    KEYS = ("loss", "ce", "ortho", "kd", "train_acc", "clean_acc", "val_loss", "grad_abs_cos", "grad_cos2", "lr", "seconds")

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.down_until = 0.0

    def __call__(self, epoch: int, row: dict) -> None:
        if not self.run_id or time.time() < getattr(self, "down_until", 0.0):
            return  # no run yet, or MLflow just failed: the trial's sync.track logs the epochs from the record
        metrics = {("epoch_seconds" if k == "seconds" else k): row[k] for k in self.KEYS if k in row}
        try:
            log_metrics(self.tracking_uri, self.run_id, metrics, step=epoch)
        except Exception as err:  # noqa: BLE001 -- tracking trouble must not kill a training run

            self.down_until = time.time() + 60  # one slow failure a minute, not one per epoch
            log.warning("could not log epoch %d metrics to MLflow: %s", epoch, redact((str(err).splitlines() or [""])[0]))


def metric_key(row: dict) -> str:
    """Metric name of an evaluation cell: ``pgd_eps0.196_acc``; clean accuracy is ``clean_eval_acc``;
    variants (RS*, SORS*) are prefixed with the variant name."""
    base = "clean_eval" if row["attack"] == "none" else f"{row['attack']}_eps{row['eps']:.3f}"
    if row.get("role") == "sanity":  # extra comparison cells: steps in the name, they may share attack and eps
        base = f"sanity.{row['attack']}_steps{row.get('steps') or 0}_eps{row['eps']:.3f}"
    prefix = f"{row['variant']}." if row.get("variant") and row["variant"] != row["trial"] else ""
    return f"{prefix}{base}"


def eval_metrics(rows: Iterable[dict]) -> dict[int, dict[str, float]]:
    """``{seed: {metric: value}}`` for cell rows: accuracy, its interval, and the all-path accuracy."""
    by_seed: dict[int, dict[str, float]] = {}
    for row in rows:
        key = metric_key(row)
        metrics = by_seed.setdefault(int(row.get("seed") or 0), {})
        metrics[f"{key}_acc"] = row["accuracy"]
        metrics[f"{key}_ci_low"] = row["ci_low"]
        metrics[f"{key}_ci_high"] = row["ci_high"]
        if row.get("all_path_accuracy") is not None:
            metrics[f"{key}_all_path_acc"] = row["all_path_accuracy"]
    return by_seed


def log_eval_rows(tracking_uri: str, run_id: str, rows: list[dict]) -> None:
    """Evaluation cells as metrics on the trial's run (step = evaluation seed)."""
    for seed, metrics in eval_metrics(rows).items():
        log_metrics(tracking_uri, run_id, metrics, step=seed)


def log_artifacts(tracking_uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str) -> None:
    """Upload files to the run under ``artifact_path`` (keeping hive folders of Parquet cells)."""
    mlflow_client = client(tracking_uri)
    for path in paths:
        path = Path(path)
        sub = artifact_path
        if path.suffix == ".parquet" and path.parent.name.startswith("attack="):
            sub = f"{artifact_path}/{path.parent.parent.name}/{path.parent.name}"
        _retry(mlflow_client.log_artifact, run_id, str(path), sub)


def log_model(tracking_uri: str, run_id: str, model) -> None:
    """The trained model via ``mlflow.pytorch.log_model`` (pickle format; requirements given, not inferred)."""
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

