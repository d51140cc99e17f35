"""Train one model: the per-worker function Ray Train runs, around :func:`sors.train.fit`.

Each worker trains on its slice of every global batch (``sors.train``: every example once per epoch)
and draws the same sampled path each step as every other rank (the path generator is seeded per
step), with gradients all-reduced by hand -- no DDP wrapper, because the SORS loss backprops twice
and leaves unsampled candidates without gradients. Rank 0's weights and buffers are broadcast at
the start and after a restore, BatchNorm normalises over the global batch and running statistics
are averaged each epoch (``sors.distributed``). After every epoch each rank writes a digest of its
parameters and buffers into the checkpoint folder (rank 0 also writes the weights), and all ranks
call ``ray.train.report`` with it, so a resumed run continues from the latest epoch and anyone can
check that the ranks stayed identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sors import config as config_lib
from sors import train as train_lib
from tasks import storage

CHECKPOINT_FILE = "model.pt"
DIGEST_FILE = "params-rank{rank}.sha256"


def params_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (state_dict order): equal iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rank_digests(checkpoint_dir: str | Path) -> dict[int, str]:
    """``{rank: params digest}`` from a checkpoint folder written by :func:`train_worker`."""
    found = {}
    for path in Path(checkpoint_dir).glob(DIGEST_FILE.format(rank="*")):
        found[int(path.name.split("-rank")[1].split(".")[0])] = path.read_text().strip()
    return found


def with_local_teacher(cfg: config_lib.RunConfig) -> config_lib.RunConfig:
    """``cfg`` with ``train.teacher`` pointing at a local copy of the teacher checkpoint."""
    if not cfg.train.teacher:
        return cfg
    local = str(storage.local_copy(cfg.train.teacher))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, teacher=local))


def _device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def _report(state: train_lib.TrainState, cfg: config_lib.RunConfig, metrics: dict, rank: int) -> None:
    """Checkpoint this epoch on every rank (digest; weights on rank 0) and report it to Ray Train."""
    import ray
    import ray.train

    digest = params_digest(state.model)
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            train_lib.save_checkpoint(Path(folder) / CHECKPOINT_FILE, state, cfg)
        (Path(folder) / DIGEST_FILE.format(rank=rank)).write_text(digest + "\n")
        ray.train.report(
            {
                **metrics,
                "epoch": state.epoch,
                "params_digest": digest,
                "node_id": ray.get_runtime_context().get_node_id(),
            },
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"epoch_{state.epoch:04d}",
        )


def train_worker(loop_config: dict) -> None:
    """Ray Train worker entry point.

    ``loop_config``: ``{"config": sors.config.to_dict(cfg), "epoch_hook": callable(epoch, row) | None}``;
    the hook (e.g. an MLflow logger) runs on rank 0 only, after each epoch, before the checkpoint.
    """
    import ray.train

    cfg = with_local_teacher(config_lib.resolve(config_lib.from_dict(loop_config["config"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device()
    state = None
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as folder:
            state, _, _ = train_lib.load_checkpoint(Path(folder) / CHECKPOINT_FILE, device=device, with_optimizer=True)
    hook: Callable | None = loop_config.get("epoch_hook") if rank == 0 else None
    reported = []

    def on_epoch_end(state: train_lib.TrainState, row: dict) -> None:
        if hook:
            hook(state.epoch, row)
        _report(state, cfg, row, rank)
        reported.append(state.epoch)

    state = train_lib.fit(cfg, state, rank, world, device, on_epoch_end=on_epoch_end)
    if not reported and restored is None:  # train.epochs = 0: still hand back the initial weights
        _report(state, cfg, {}, rank)
