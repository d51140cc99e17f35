"""Checks a command's inputs before it writes or launches anything.

A sweep that fails after an hour because the results folder is read-only, the data is not on the
node, the tracking server is down or a checkpoint was truncated wastes the hour; worse, it can
leave half-written state behind. The CLI therefore runs these checks first. Each raises
:class:`PreflightError` with one line naming the input at fault; none of them writes a file
(no folder is created, no MLflow store is opened for writing, no Ray is started).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from pipeline.redact import redact
from pipeline.store import records, results
from sors import data as data_lib
from sors import train as train_lib
from sors.errors import quote
from sors.models import model_size
from tasks import storage
from tasks.training import CHECKPOINT_FILE

PROBE_TIMEOUT_S = 5.0  # tracking server and Ray address probes
# Above these a model is almost surely a typo (model.n_ops=1000000, lenet5*99999); --allow-large runs it anyway.
MAX_WEIGHT_BYTES = 2 << 30
MAX_MEMBERS = 64


class PreflightError(ValueError):
    """An input that cannot work; the one-line message names it and why."""


# ---------------------------------------------------------------- folders


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# Kernel and device file systems: writable-looking to root, but no folder can be made there.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "mqueue",
        "binfmt_misc",
        "efivarfs",
        "hugetlbfs",
        "autofs",
        "nsfs",
    }
)


def filesystem_type(path: Path) -> str | None:
    """The type of the file system ``path`` is on (the longest mount point above it in
    ``/proc/self/mounts``), or None where that table cannot be read (not Linux)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_folder(path: str | os.PathLike, option: str) -> None:
    """``path`` is, or can be created as, a writable folder (nothing is created here)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{option} {path}: is a file, not a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise PreflightError(f"{option} {path}: {existing} is a file, not a folder")
    if filesystem_type(existing) in PSEUDO_FILESYSTEMS:
        raise PreflightError(
            f"{option} {path}: {existing} is on the kernel's {filesystem_type(existing)} file "
            "system, not a place for files"
        )
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_mount(existing):
        where = "" if existing == path else f" ({existing} cannot be written to create it)"
        raise PreflightError(f"{option} {path}: folder is not writable{where}")


# URI schemes Ray Train's storage (pyarrow.fs) reads and writes.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def check_storage(storage_path: str | None) -> None:
    """``--storage-path``: a writable local folder, or a URI of a scheme pyarrow's file systems know
    (``s3://``...; the bucket itself is checked by Ray when used)."""
    if not storage_path:
        return
    if "://" not in storage_path:
        check_folder(storage_path, "--storage-path")
        return
    scheme = storage_path.split("://", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:
        raise PreflightError(
            f"--storage-path {redact(storage_path)}: unsupported scheme {quote(scheme)} "
            f"(expected a folder or {', '.join(s + '://' for s in STORAGE_SCHEMES)})"
        )
    if scheme == "file":
        check_folder(storage_path[len("file://") :], "--storage-path")


# ---------------------------------------------------------------- model sizes


def _size_text(size) -> str:
    unit, scale = ("GiB", 2**30) if size.weight_bytes >= 2**30 else ("MiB", 2**20)
    return f"{size.parameters:,} parameters, {size.weight_bytes / scale:,.1f} {unit} of weights"


def check_model_size(cfg, where: str, allow_large: bool = False) -> str:
    """The size of the model ``cfg`` describes, counted without building it (``sors.models.model_size``);
    PreflightError above :data:`MAX_WEIGHT_BYTES` of weights or :data:`MAX_MEMBERS` ensemble members
    unless ``allow_large``. Returns the size as text for the dry run."""
    size = model_size(cfg)  # ConfigError: unknown model or member, an option the model does not take
    too_big = size.weight_bytes > MAX_WEIGHT_BYTES or size.members > MAX_MEMBERS
    if too_big and not allow_large:
        raise PreflightError(
            f"{where}: {cfg.model.name} would have {_size_text(size)}, {size.members} "
            f"member(s): over the limit of {MAX_WEIGHT_BYTES >> 30} GiB of weights and "
            f"{MAX_MEMBERS} members (pass --allow-large to run it anyway)"
        )
    members = f", {size.members} members" if size.members > 1 else ""
    return _size_text(size) + members


# ---------------------------------------------------------------- data


def check_data(datasets: Iterable[tuple[str, str | None]]) -> None:
    """Every ``(data set name, root)`` pair can be read (``DataNotFoundError`` names the files)."""
    for name, root in sorted(set(datasets), key=str):
        data_lib.check_intact(name, root)  # every file whole: a truncated train file fails here, not mid-sweep
        data_lib.load(name, "test", root, n=1)


# ---------------------------------------------------------------- tracking


@contextlib.contextmanager
def _quick_mlflow_requests():
    """MLflow's HTTP client retries for minutes by default; a probe should answer in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(PROBE_TIMEOUT_S))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _why(err: BaseException) -> str:
    """A short reason from an MLflow/requests error (its messages run to several lines)."""
    text = str(err)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("401", "HTTP 401: credentials refused"),
        ("403", "HTTP 403: access denied"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
    ):
        if needle in text:
            return reason
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return redact(lines[-1][:200]) if lines else type(err).__name__


def tracking_reachable(uri: str) -> str | None:
    """None when the MLflow server at ``uri`` answers an API call, else a short reason."""
    from mlflow.tracking import MlflowClient

    with _quick_mlflow_requests():
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 -- MLflow wraps transport errors in several types
            return _why(err)
    return None


def check_tracking(uri: str | None, results_dir: str | os.PathLike) -> None:
    """An MLflow tracking URI that will work: a server that answers, or a SQLite file whose folder
    can be written. ``None`` means the default store inside the results folder (checked with it)."""
    if not uri:
        return
    shown = redact(uri)
    try:
        parsed = urlparse(uri)
        parsed.port  # noqa: B018 -- parses the port: ValueError for a bad one
    except ValueError as err:
        raise PreflightError(f"--tracking-uri {shown}: not a valid URI ({err})") from None
    if parsed.scheme in ("http", "https"):
        reason = tracking_reachable(uri)
        if reason:
            raise PreflightError(f"--tracking-uri {shown}: MLflow tracking server unreachable ({reason})")
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else parsed.path)
        inside = str(path.absolute()).startswith(str(Path(results_dir).absolute()) + os.sep)
        if not inside:
            check_folder(path.parent, f"--tracking-uri {shown}:")
        check_sqlite_file(path, f"--tracking-uri {shown}")
    elif parsed.scheme in ("file", ""):
        check_folder(parsed.path or uri, "--tracking-uri")
    elif parsed.scheme not in ("databricks", "postgresql", "mysql", "mssql", "uc"):
        raise PreflightError(
            f"--tracking-uri {shown}: unsupported scheme {parsed.scheme!r} "
            "(expected http(s)://host:port, sqlite:///file.db or a database URI)"
        )


def check_sqlite_file(path: Path, option: str) -> None:
    """An existing SQLite store must be a file this process can write (MLflow otherwise retries a
    read-only database for minutes before it gives up)."""
    if path.is_dir():
        raise PreflightError(f"{option}: {path} is a folder, not a database file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise PreflightError(f"{option}: {path} is not writable")


# ---------------------------------------------------------------- Ray


def _tcp_reachable(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def _auto_address() -> str:
    from ray._private import services  # private, but it is what ray.init("auto") itself uses

    try:
        return services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as err:
        raise PreflightError(f"--ray-address auto: {str(err).splitlines()[0]}") from None


def check_ray_address(address: str | None, num_cpus: int | None = None) -> None:
    """``--ray-address`` names a Ray that answers (``auto``: the one this machine belongs to);
    ``--num-cpus`` is positive. The default (a local Ray) needs nothing."""
    if num_cpus is not None and num_cpus < 1:
        raise PreflightError(f"--num-cpus {num_cpus}: must be at least 1")
    if address in (None, "", "local"):
        return
    target = address
    if address == "auto":
        try:
            target = _auto_address()
        except (ImportError, AttributeError):
            return  # Ray moved its helper: ray.init will say what is wrong
    try:
        parsed = urlparse(target if "://" in target else f"ray://{target}")
        host = parsed.hostname
    except ValueError:
        parsed, host = None, None
    if host is None or parsed.scheme not in ("ray", "rays"):
        raise PreflightError(f"--ray-address {address}: expected auto, host:port or ray://host:port")
    try:
        port = parsed.port or (10001 if "://" in target else 6379)
    except ValueError:
        raise PreflightError(f"--ray-address {address}: bad port") from None
    reason = _tcp_reachable(parsed.hostname, port)
    if reason:
        raise PreflightError(f"--ray-address {address}: no Ray at {parsed.hostname}:{port} ({reason})")


# ---------------------------------------------------------------- stored results and checkpoints


def check_store(store_root: str | os.PathLike) -> None:
    """Every cell file in the Parquet store is whole (a truncated one would be taken as done)."""
    for path in results.files(store_root):
        if not results.is_intact(path):
            raise results.unreadable(path)


def latest_epoch_checkpoint(run_dir: Path) -> Path | None:
    """The weights file of the checkpoint Ray Train would restore for a run folder, if any."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return None
    name = latest.get("checkpoint_dir_name")
    return run_dir / name / CHECKPOINT_FILE if name else None


def check_checkpoints(sweep, opts) -> None:
    """The checkpoints a sweep would read are intact: a teacher file loads; a finished trial's final
    checkpoint has the SHA-256 its record holds; an unfinished trial's latest epoch checkpoint loads."""
    # Ray is a heavy import (seconds); pipeline.cluster.trainer is needed here only for run folder names
    from pipeline.cluster import trainer

    for trial in sweep.trials:
        teacher = trial.config.train.teacher
        if teacher and not trial.teacher_trial and not storage.is_remote(teacher):
            local = storage.local_copy(teacher)
            train_lib.checkpoint_config(local, train_lib.read_checkpoint(local))  # CheckpointError names the file
        record = records.load_record(opts.results_dir, sweep.name, trial.name)
        if record and not storage.is_remote(record.get("checkpoint_uri", "")):
            path = storage.local_copy(record.checkpoint_uri)
            where = records.record_path(opts.results_dir, sweep.name, trial.name)
            if not path.is_file():
                raise PreflightError(f"{path}: checkpoint of trial {trial.name} is missing; delete {where} to retrain")
            if storage.file_sha256(path) != record.checkpoint_sha256:
                raise PreflightError(
                    f"{path}: checkpoint of trial {trial.name} is truncated or changed since "
                    f"training (SHA-256 differs from {where}); delete that record to retrain"
                )
        elif not record and not storage.is_remote(opts.storage_path):
            run_dir = Path(opts.storage_path) / trainer.run_name(sweep.name, trial.name, trial.config)
            latest = latest_epoch_checkpoint(run_dir)
            if latest is not None:
                train_lib.read_checkpoint(latest)  # CheckpointError names the file


# ---------------------------------------------------------------- everything a command needs


def check_inputs(
    results_dir: str,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    datasets: Iterable[tuple[str, str | None]] = (),
) -> None:
    """Results folder, checkpoint storage, data, tracking, Ray -- in that order, cheapest first."""
    check_folder(results_dir, "--results-dir")
    check_storage(storage_path)
    check_ray_address(ray_address, num_cpus)
    check_data(datasets)
    check_tracking(tracking_uri, results_dir)
