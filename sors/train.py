"""Single-process training (no Ray): one epoch at a time, checkpoints, distillation.

Ray Train workers call :func:`fit` with their rank and world size; under data parallelism every
rank draws the same paths each step (the path generator is seeded from (seed, epoch, step)), so
the all-reduced gradients belong to the same sub-networks. How the ranks stay identical (broadcast,
global-batch BatchNorm, buffer averaging, every example once per epoch) is in ``sors.distributed``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import pickle
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sors import config as config_lib
from sors import data as data_lib
from sors import distributed, losses, metrics
from sors.config import RunConfig
from sors.errors import ConfigError, TrainingDiverged
from sors.kernels import retain_freed_memory
from sors.models import build_from_config, model_size
from sors.models.supernet import SuperNet

log = logging.getLogger("sors.train")
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and why."""


@dataclass
class TrainState:
    """What a resumed run needs: model and optimiser state, the next epoch and the history so far."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """Path generator for one step, identical on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


def make_optimizer(model: nn.Module, train: config_lib.TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam, as the config says."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def learning_rate(train: config_lib.TrainConfig, epoch_progress: float, world: int = 1) -> float:
    """lr at a point of training (epochs, fractional): ``train.lr`` (times ``world`` workers under
    ``train.lr_scaling=linear``, the global batch being ``world`` times larger), linear warm-up, then
    step decay at milestones."""
    base = train.lr * (world if train.lr_scaling == "linear" else 1)
    lr = base * train.lr_gamma ** sum(1 for m in train.milestones if epoch_progress >= m)
    if train.warmup_epochs > 0 and epoch_progress < train.warmup_epochs:
        lr *= (epoch_progress + 1e-3) / train.warmup_epochs
    return lr


def lambda_at(train: config_lib.TrainConfig, epoch_progress: float) -> float:
    """Orthogonality weight at a point of training: ramps linearly from 0 over ``lambda_warmup``
    epochs, because the cos^2 term fights the recognition loss before the paths can classify."""
    if train.lambda_warmup > 0 and epoch_progress < train.lambda_warmup:
        return train.lambda_ * epoch_progress / train.lambda_warmup
    return train.lambda_


def batch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: config_lib.TrainConfig,
    generator: torch.Generator,
    teacher: nn.Module | None,
    lam: float | None = None,
) -> losses.LossParts:
    """The configured loss for one batch: SORS for super-networks, plain CE otherwise."""
    teacher_probs = None
    if teacher is not None:
        with torch.no_grad():
            teacher_probs = torch.softmax(teacher(x), dim=-1)
    if isinstance(model, SuperNet):
        paths = losses.sample_paths(model, train.paths_per_step, generator)
        return losses.sors_loss(
            model,
            x,
            y,
            lam=train.lambda_ if lam is None else lam,
            teacher_probs=teacher_probs,
            kd_weight=train.kd_weight,
            paths=paths,
        )
    return losses.plain_loss(model, x, y, teacher_probs, train.kd_weight)


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The epoch's seeded shuffle of example indices, the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: RunConfig,
    epoch: int,
    teacher: nn.Module | None = None,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """One pass over the training set: each step one global batch of ``batch_size * world`` examples
    (every example exactly once per epoch), this rank training on its slice. Returns loss, ce, ortho,
    kd and train_acc, batch-averaged and averaged over the ranks."""
    train = cfg.train
    model.train()
    batches = distributed.global_batches(epoch_order(len(labels), epoch, train.seed), train.batch_size, world)
    steps = len(batches)
    sums = {"loss": 0.0, "ce": 0.0, "ortho": 0.0, "kd": 0.0, "train_acc": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    retain_freed_memory()  # CPU: steps reuse their buffers instead of page-faulting them in again
    for step, batch in enumerate(batches):
        x, y = images[batch], labels[batch]
        if cfg.data.augment:  # the whole global batch, then this rank's slice: as one worker would see it
            x = data_lib.augment_batch(x, step_generator(train.seed, epoch, step))
        mine = distributed.rank_slice(torch.arange(len(batch)), rank, world)
        x, y = x[mine].to(device), y[mine].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(train, epoch + step / steps, world)
        parts = batch_loss(
            model,
            x,
            y,
            train,
            step_generator(train.seed, epoch, step),
            teacher,
            lam=lambda_at(train, epoch + step / steps),
        )
        optimizer.zero_grad(set_to_none=True)
        # parameters only: no gradient w.r.t. the input images; scaled by this rank's share of the batch
        losses.backward_into(parts, params, scale=distributed.loss_scale(len(y), len(batch), world))
        distributed.allreduce_gradients(model)
        optimizer.step()
        loss = parts.total.item()
        if not math.isfinite(loss):  # .item() syncs anyway: the check is free
            raise TrainingDiverged(
                f"training diverged: loss {loss} at epoch {epoch + 1}, step {step + 1}/{steps} "
                f"(train.lr={train.lr:g}; try a lower learning rate)"
            )
        sums["loss"] += loss
        sums["ce"] += parts.ce.item()
        sums["ortho"] += parts.ortho.item()
        sums["kd"] += parts.kd.item()
        sums["train_acc"] += (parts.logits.argmax(-1) == y).float().mean().item()
        if on_step:
            on_step(step + 1, steps)
    distributed.average_buffers(model)
    return distributed.mean_over_ranks({k: v / steps for k, v in sums.items()})


def clean_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy on (images, labels) with the model in eval mode, paths sampled as in deployment."""
    return clean_metrics(model, images, labels, batch_size, device)[0]


@torch.no_grad()
def clean_metrics(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` on (images, labels) in eval mode, paths sampled as in
    deployment: the validation accuracy and loss of an epoch (Fig. 8)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for x, y in data_lib.batches(images, labels, batch_size):
        logits = model(x.to(device))
        y = y.to(device)
        correct += (logits.argmax(-1) == y).sum().item()
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    model.train(was_training)
    return correct / max(1, len(labels)), loss / max(1, len(labels))


def load_teacher(path: str | None, device="cpu") -> nn.Module | None:
    """The distillation teacher from its checkpoint file, frozen in eval mode, or None."""
    if not path:
        return None
    teacher, _, _ = load_checkpoint(path, device=device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_split(cfg: RunConfig, split: str):
    """(images, labels) of a split, with the configured subset size."""
    n = cfg.data.n_train if split == "train" else cfg.data.n_test
    return data_lib.load(cfg.data.name, split, cfg.data.root, n=n, seed=cfg.data.seed)


def new_state(cfg: RunConfig, device="cpu") -> TrainState:
    """A freshly initialised model (seeded by ``train.seed``) and its optimiser."""
    torch.manual_seed(cfg.train.seed)
    model = build_from_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, average_paths=1)))
    if cfg.model.init == "perturbed_copies" and isinstance(model, SuperNet):
        model.init_perturbed_copies_(cfg.model.init_noise, torch.Generator().manual_seed(cfg.train.seed))
    model.to(device)
    return TrainState(model, make_optimizer(model, cfg.train))


def fit(
    cfg: RunConfig,
    state: TrainState | None = None,
    rank: int = 0,
    world: int = 1,
    device="cpu",
    on_epoch_end: Callable[[TrainState, dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    data=None,
) -> TrainState:
    """Train ``cfg`` (resolved) to ``cfg.train.epochs``, continuing from ``state`` when given.

    Each epoch's metrics (loss, ce, ortho, kd, train_acc, clean_acc, val_loss -- cross-entropy on the
    test subset --, grad_abs_cos, grad_cos2, lr, seconds) are appended to ``state.history`` and passed to ``on_epoch_end``.
    ``data``: optional ((train_x, train_y), (test_x, test_y)) to skip loading.
    """
    cfg = config_lib.resolve(cfg)
    (train_x, train_y), (test_x, test_y) = data or (load_split(cfg, "train"), load_split(cfg, "test"))
    state = state or new_state(cfg, device)
    if world > 1:
        distributed.sync_batchnorm_(state.model)
    distributed.broadcast_state(state.model)  # rank 0's weights, fresh or restored, on every rank
    teacher = load_teacher(cfg.train.teacher, device)
    probe_x, probe_y = test_x[:64].to(device), test_y[:64].to(device)
    while state.epoch < cfg.train.epochs:
        start = time.perf_counter()
        row = train_one_epoch(
            state.model, state.optimizer, train_x, train_y, cfg, state.epoch, teacher, rank, world, device, on_step
        )
        check_finite_weights(state.model, state.epoch + 1, cfg.train.lr)  # before any checkpoint of them
        row["clean_acc"], row["val_loss"] = clean_metrics(state.model, test_x, test_y, device=device)
        row.update(
            metrics.gradient_orthogonality(
                state.model, probe_x, probe_y, n_pairs=4, generator=torch.Generator().manual_seed(state.epoch)
            )
            or {}
        )
        row.update(epoch=state.epoch + 1, lr=state.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start)
        state.epoch += 1
        state.history.append(row)
        log.info(
            "epoch %d/%d %s",
            state.epoch,
            cfg.train.epochs,
            " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
        if on_epoch_end:
            on_epoch_end(state, row)
    return state


def check_finite_weights(model: nn.Module, epoch: int, lr: float) -> None:
    """Raise :class:`TrainingDiverged` when a parameter holds NaN or inf (one reduction per tensor)."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise TrainingDiverged(
                f"training diverged: parameter {name} is not finite after epoch {epoch} "
                f"(train.lr={lr:g}; try a lower learning rate)"
            )


def checkpoint_payload(state: TrainState, cfg: RunConfig) -> dict:
    """Everything a checkpoint holds, as tensors and plain Python values (loadable with weights_only)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_state": state.model.state_dict(),
        "optimizer_state": state.optimizer.state_dict(),
        "config": config_lib.to_dict(cfg),
        "config_hash": config_lib.config_hash(cfg),
        "epoch": state.epoch,
        "history": state.history,
    }


def save_checkpoint(path: str | os.PathLike, state: TrainState, cfg: RunConfig) -> Path:
    """Write a checkpoint atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(checkpoint_payload(state, cfg), tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    """The raw checkpoint dict, loaded with ``weights_only=True`` (no arbitrary pickle code runs).

    Raises :class:`CheckpointError` with a one-line reason naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:  # torch.save writes a zip archive; anything else is not ours
        if handle.read(4) != b"PK\x03\x04":
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (no zip archive: empty, corrupt or another format)"
            )
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused to load (not weights-only: {first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation, OSError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt: {type(err).__name__})") from None
    if not isinstance(payload, dict) or "model_state" not in payload or "config" not in payload:
        raise CheckpointError(f"{path}: not a SORS checkpoint (no model_state/config)")
    if not isinstance(payload["config"], dict) or not isinstance(payload["model_state"], dict):
        raise CheckpointError(f"{path}: not a SORS checkpoint (its config or model_state is not a mapping)")
    return payload


def checkpoint_config(path: str | os.PathLike, payload: dict) -> RunConfig:
    """The resolved, validated config a checkpoint (read by :func:`read_checkpoint`) was trained with,
    its model and every ensemble member known and of a size that can be counted; CheckpointError naming
    the file and the bad option otherwise (a tampered or foreign checkpoint fails here, not mid-run)."""
    try:
        cfg = config_lib.resolve(config_lib.from_dict(payload["config"]))
        model_size(cfg)
    except ConfigError as err:
        raise CheckpointError(f"{path}: bad config in the checkpoint ({err})") from None
    return cfg


def load_checkpoint(path: str | os.PathLike, device="cpu", with_optimizer: bool = False):
    """``(model, cfg, payload)`` from a checkpoint; with ``with_optimizer`` returns a :class:`TrainState` as model."""
    payload = read_checkpoint(path, device)
    cfg = config_lib.from_dict(payload["config"])
    state = new_state(cfg, device)
    try:
        state.model.load_state_dict(payload["model_state"])
        if with_optimizer:
            state.optimizer.load_state_dict(payload["optimizer_state"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path}: weights do not fit the model in its config ({str(err).splitlines()[0][:160]})"
        ) from None
    state.epoch = int(payload.get("epoch", 0))
    state.history = list(payload.get("history", []))
    return (state if with_optimizer else state.model), cfg, payload
