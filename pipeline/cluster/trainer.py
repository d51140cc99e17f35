"""Ray Train (V2): a ``TorchTrainer`` per model, data parallel over ``train.num_workers``.

Process group: gloo on CPU, NCCL on GPU (TorchTrainer picks it from ``use_gpu``). Checkpoints go to
``storage_path/<run name>/epoch_NNNN`` (a local or shared folder, or a cloud URI such as ``s3://``).
The run name is ``<sweep>.<trial>.<config hash>``, so running the same trial again -- after a worker
failure (``FailureConfig(max_failures)``), a Ctrl-C, or ``sors sweep --resume`` -- restores the
latest epoch checkpoint instead of starting over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train.torch import TorchTrainer

from pipeline.cluster import connection as cluster
from sors import config as config_lib
from sors.config import RunConfig
from tasks import training


@dataclass(frozen=True)
class TrainOutcome:
    """Where a finished training run left its final checkpoint."""

    run_name: str
    checkpoint_dir: str  # filesystem path (local) or path inside the storage filesystem
    checkpoint_uri: str  # the weights file, as a local path or URI readable by tasks.storage.local_copy
    metrics: dict


def run_name(sweep: str, trial: str, cfg: RunConfig) -> str:
    """Deterministic Ray Train run name: same trial + same config -> same run (resumable)."""
    return f"{sweep}.{trial}.{config_lib.config_hash(cfg)[:8]}"


def use_gpu(cfg: RunConfig) -> bool:
    """``train.use_gpu`` when set, else whether the cluster has GPUs."""
    return cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster.has_gpu()


def default_storage(results_dir: str | os.PathLike) -> str:
    """Checkpoints under the results folder unless ``--storage-path`` says otherwise."""
    return str(Path(results_dir).resolve() / "ray")


def build_trainer(
    cfg: RunConfig, name: str, storage_path: str, epoch_hook=None, max_failures: int = 1, callbacks: list | None = None
) -> TorchTrainer:
    """The ``TorchTrainer`` for one resolved config (``epoch_hook(epoch, row)`` runs on rank 0)."""
    gpu = use_gpu(cfg)
    return TorchTrainer(
        training.train_worker,
        train_loop_config={"config": config_lib.to_dict(cfg), "epoch_hook": epoch_hook},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )


def checkpoint_uri(storage_path: str, name: str, checkpoint_dir: str) -> str:
    """URI of the weights file in a reported checkpoint folder (keeps the storage scheme, e.g. ``s3://``)."""
    return f"{storage_path.rstrip('/')}/{name}/{Path(checkpoint_dir).name}/{training.CHECKPOINT_FILE}"


def train_on_ray(
    cfg: RunConfig, name: str, storage_path: str, epoch_hook=None, max_failures: int = 1, callbacks: list | None = None
) -> TrainOutcome:
    """Train (or finish training) one model with Ray Train; returns its final checkpoint."""
    result = build_trainer(cfg, name, storage_path, epoch_hook, max_failures, callbacks).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    folder = result.checkpoint.path
    return TrainOutcome(
        run_name=name,
        checkpoint_dir=folder,
        checkpoint_uri=checkpoint_uri(storage_path, name, folder),
        metrics=dict(result.metrics or {}),
    )
