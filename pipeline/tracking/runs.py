"""MLflow tracking: one experiment per sweep (tagged as model training), a parent run per sweep (and
per nightly night) and a run per trial nested under it (``mlflow.parentRunId``).

Params are the trial's whole resolved config (``sors.config.flat_dict``); per-epoch training metrics
are logged from Ray Train's rank 0 (:class:`EpochLogger` travels to the worker, step = epoch);
evaluation results become metrics on the same run at step 0 (``pgd_eps0.196_acc``: the mean over the
evaluation seeds, and ``pgd_eps0.196_seed1_acc`` per seed when there are several); the data splits are
run inputs (``mlflow.log_input`` with the split's digest); every run carries the source commit
(``mlflow.source.git.commit``) when the code is a git checkout. The cell files and the checkpoint are
trial artifacts, the report and plots artifacts of the parent; artifacts are uploaded when their
SHA-256 differs from the run's manifest (``sors-manifest.json``), so a sync compares content, not
names. The model itself: :mod:`pipeline.tracking.model_registry`.

Default store: ``sqlite:///<results>/mlflow.db`` with artifacts under ``<results>/mlartifacts``;
``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` points at a server instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

from pipeline.redact import redact, redact_mapping
from sors import data as data_lib
from tasks import storage

log = logging.getLogger("pipeline.tracking.runs")
# MLflow's HTTP client retries a failing call for about 4 minutes by default; a sweep must not stall that
# long per call while the server is down (what it cannot log, `sors sync` backfills). Users may override.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
TAG_SWEEP, TAG_TRIAL, TAG_HASH, TAG_PRESET, TAG_CODE = (
    "sors.sweep",
    "sors.trial",
    "sors.config_hash",
    "sors.preset",
    "sors.code_version",
)
TAG_PARENT, TAG_COMMIT = "mlflow.parentRunId", "mlflow.source.git.commit"
TAG_ROLE, TAG_PARENT_KEY = "sors.run_role", "sors.parent_key"  # role: sweep | nightly | trial
TAG_CHECKPOINT = "sors.checkpoint_sha256"  # set once the run holds its model: that model's checkpoint
# What the MLflow 3 UI reads to open an experiment on its training-runs view (not the GenAI overview).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MANIFEST = "sors-manifest.json"  # {artifact path: sha256} of the files uploaded to a run


def default_tracking_uri(results_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite file in the results folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def code_version() -> str:
    """The git commit of the code (``-dirty`` when the tree has changes), else the package version."""
    root = Path(__file__).resolve().parents[2]  # the checkout: pipeline/tracking/runs.py
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "v" + version("sors-pipeline")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The full commit id of the source when it is a git checkout, else None."""
    root = Path(__file__).resolve().parents[2]  # the checkout: pipeline/tracking/runs.py
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and len(sha) == 40 else None


def source_tags() -> dict[str, str]:
    """``{"mlflow.source.git.commit": sha}`` from a git checkout, ``{}`` otherwise (an installed package)."""
    sha = git_commit()
    return {TAG_COMMIT: sha} if sha else {}


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
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish", "Read timed out")
    )


def client(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri``, whose model registry is the same store (never the
    process-wide registry URI, which another store may have set), with bounded HTTP retries
    (see ``HTTP_DEFAULTS``)."""
    from mlflow.tracking import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created when missing (artifacts under ``artifact_root`` for local stores)."""
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made before experiments were typed
            mlflow_client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if artifact_root and tracking_uri.startswith("sqlite:"):
        location = Path(artifact_root).resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # noqa: BLE001 -- created concurrently by another process
        return mlflow_client.get_experiment_by_name(name).experiment_id


def parent_run(tracking_uri: str, experiment_id: str, key: str, run_name: str, tags: dict) -> str:
    """The parent run keyed ``key`` in the experiment (a sweep's name, a nightly night's id), created
    with ``tags`` when missing. Returns its id."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT_KEY}` = '{key}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    all_tags = {**redact_mapping(tags), TAG_PARENT_KEY: key, **source_tags()}
    return mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def find_or_create_run(
    tracking_uri: str,
    experiment_id: str,
    trial: str,
    config_hash: str,
    params: dict,
    tags: dict,
    parent_run_id: str | None = None,
    checkpoint_sha256: str | None = None,
) -> str:
    """The run of a trial under ``parent_run_id`` (same trial name and config hash: a resumed sweep
    reuses it), else a new one with ``params`` and ``tags`` logged. Returns the run id.

    A run that already holds a model (tag ``sors.checkpoint_sha256``) is only reused for that same
    checkpoint: a retrained model (``checkpoint_sha256`` None or another) gets a run of its own."""
    from mlflow.entities import Param, RunTag

    params, tags = redact_mapping(params), redact_mapping(tags)  # no credentials in params or tags
    mlflow_client = client(tracking_uri)
    query = f"tags.`{TAG_TRIAL}` = '{trial}' and tags.`{TAG_HASH}` = '{config_hash}'"
    if parent_run_id:
        query += f" and tags.`{TAG_PARENT}` = '{parent_run_id}'"
    for run in mlflow_client.search_runs([experiment_id], filter_string=query, max_results=50):
        if run.data.tags.get(TAG_CHECKPOINT) in (None, checkpoint_sha256):
            return run.info.run_id
    all_tags = {TAG_TRIAL: trial, TAG_HASH: config_hash, TAG_ROLE: "trial", **tags, **source_tags()}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=trial, tags=all_tags)
    params = [Param(k, "None" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        mlflow_client.log_batch(run.info.run_id, params=params[start : start + 100])
    mlflow_client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics (None and non-numbers skipped) at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ]
    for start in range(0, len(batch), 1000):
        _retry(client(tracking_uri).log_batch, run_id, metrics=batch[start : start + 1000])


class EpochLogger:
    """Picklable per-epoch metric logger that Ray Train's rank 0 calls as ``logger(epoch, row)``."""

    KEYS = (
        "loss",
        "ce",
        "ortho",
        "kd",
        "train_acc",
        "clean_acc",
        "val_loss",
        "grad_abs_cos",
        "grad_cos2",
        "lr",
        "seconds",
    )

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
            log.warning(
                "could not log epoch %d metrics to MLflow: %s", epoch, redact((str(err).splitlines() or [""])[0])
            )


def metric_key(row: dict) -> str:
    """Metric name of an evaluation cell: ``pgd_eps0.196_acc``; clean accuracy is ``clean_eval_acc``;
    variants (RS*, SORS*) are prefixed with the variant name."""
    base = "clean_eval" if row["attack"] == "none" else f"{row['attack']}_eps{row['eps']:.3f}"
    if row.get("role") == "sanity":  # extra comparison cells: steps in the name, they may share attack and eps
        base = f"sanity.{row['attack']}_steps{row.get('steps') or 0}_eps{row['eps']:.3f}"
    prefix = f"{row['variant']}." if row.get("variant") and row["variant"] != row["trial"] else ""
    return f"{prefix}{base}"


def _cell_values(row: dict) -> dict[str, float]:
    values = {"acc": row["accuracy"], "ci_low": row["ci_low"], "ci_high": row["ci_high"]}
    if row.get("all_path_accuracy") is not None:
        values["all_path_acc"] = row["all_path_accuracy"]
    return values


def eval_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """``{metric: value}`` for cell rows (logged at step 0: a seed is not a time step). Per cell:
    accuracy, its interval and the all-path accuracy, each the mean over the cell's evaluation seeds;
    with several seeds also each seed's own values (``pgd_eps0.196_seed1_acc``)."""
    by_cell: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        by_cell.setdefault(metric_key(row), {})[int(row.get("seed") or 0)] = _cell_values(row)
    metrics: dict[str, float] = {}
    for key, seeds in by_cell.items():
        for name in {n for values in seeds.values() for n in values}:
            present = [values[name] for values in seeds.values() if name in values]
            metrics[f"{key}_{name}"] = sum(present) / len(present)
            if len(seeds) > 1:
                metrics.update(
                    {f"{key}_seed{seed}_{name}": values[name] for seed, values in seeds.items() if name in values}
                )
    return metrics


def log_eval_rows(tracking_uri: str, run_id: str, rows: list[dict]) -> None:
    """Evaluation cells as metrics on the trial's run (see :func:`eval_metrics`)."""
    log_metrics(tracking_uri, run_id, eval_metrics(rows), step=0)


def artifact_dest(path: Path, artifact_path: str) -> str:
    """The run folder a file goes to: ``artifact_path``, keeping the hive folders of a Parquet cell."""
    if path.suffix == ".parquet" and path.parent.name.startswith("attack="):
        return f"{artifact_path}/{path.parent.parent.name}/{path.parent.name}"
    return artifact_path


def log_artifacts(tracking_uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str) -> None:
    """Upload files to the run under ``artifact_path`` (keeping hive folders of Parquet cells)."""
    mlflow_client = client(tracking_uri)
    for path in paths:
        path = Path(path)
        _retry(mlflow_client.log_artifact, run_id, str(path), artifact_dest(path, artifact_path))


def read_manifest(tracking_uri: str, run_id: str) -> dict[str, str]:
    """The run's ``{artifact path: sha256}`` manifest, ``{}`` when it has none."""
    names = {info.path for info in client(tracking_uri).list_artifacts(run_id)}
    if MANIFEST not in names:
        return {}
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=MANIFEST, dst_path=folder, tracking_uri=tracking_uri
        )
        return json.loads(Path(local).read_text())


def upload_changed(tracking_uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str) -> int:
    """Upload the files whose content (SHA-256) the run does not hold yet under ``artifact_path``, then
    the updated manifest. Returns how many files were uploaded."""
    manifest = read_manifest(tracking_uri, run_id)
    todo = []
    for path in (Path(p) for p in paths):
        if not path.is_file():
            continue
        where, digest = f"{artifact_dest(path, artifact_path)}/{path.name}", storage.file_sha256(path)
        if manifest.get(where) != digest:
            todo.append(path)
            manifest[where] = digest
    if todo:
        log_artifacts(tracking_uri, run_id, todo, artifact_path)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / MANIFEST
            local.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _retry(client(tracking_uri).log_artifact, run_id, str(local))
    return len(todo)


def split_dataset(cfg, split: str):
    """The MLflow dataset of a config's data split: name, source and the digest of its images and labels
    (the same subset in every run gives the same digest)."""
    from mlflow.entities import Dataset

    n = cfg.data.n_train if split == "train" else cfg.data.n_test
    images, labels, index = data_lib.load_indexed(cfg.data.name, split, cfg.data.root, n=n, seed=cfg.data.seed)
    digest = hashlib.sha256()
    for tensor in (images.contiguous(), labels, index):
        digest.update(tensor.numpy().tobytes())
    profile = {"num_rows": int(len(labels)), "shape": list(images.shape), "subset_seed": cfg.data.seed}
    return Dataset(
        name=f"{cfg.data.name}-{split}",
        digest=digest.hexdigest()[:16],
        source_type="local",
        source=json.dumps({"data_set": cfg.data.name, "split": split, "n": n}),
        profile=json.dumps(profile),
    )


def log_datasets(tracking_uri: str, run_id: str, cfg, splits: dict[str, str]) -> None:
    """Record data splits as run inputs, ``splits``: ``{split: context}`` (``{"train": "training"}``)."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [
        DatasetInput(split_dataset(cfg, split), [InputTag("mlflow.data.context", context)])
        for split, context in splits.items()
    ]
    _retry(client(tracking_uri).log_inputs, run_id, datasets=inputs)
