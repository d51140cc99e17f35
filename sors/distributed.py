"""Data parallelism by hand over ``torch.distributed`` (gloo on CPU, NCCL on GPU), without DDP.

Why not DDP: the SORS loss backprops twice (input gradients, then the cos^2 term) and leaves the
unsampled candidates without gradients, which DDP's reducer cannot take. So a step here is: every
rank takes its slice of one *global* batch, scales its loss by its share of that batch, backprops,
and the gradients are averaged (:func:`allreduce_gradients`) -- the gradient of the global batch's
mean loss, whatever the split.

What keeps the ranks identical (and equal to one worker on the same global batch):

- :func:`broadcast_state`: rank 0's parameters and buffers at the start of training and after a
  restore, so no rank relies on identical seeding;
- :func:`sync_batchnorm_`: BatchNorm layers normalise with the statistics of the global batch,
  all-reduced with ``torch.distributed.nn`` (differentiable, also twice). Not ``nn.SyncBatchNorm``:
  it runs on GPUs only (not gloo on CPU) and its backward is an autograd Function with no double
  backward, which any loss through input gradients (SORS, the orthogonality probes) needs;
- :func:`average_buffers` after each epoch: running statistics (and any other floating buffer) are
  averaged across ranks -- a no-op when they already agree, a repair when a model updates buffers
  from local data;
- :func:`global_batches`: every example of the epoch exactly once across ranks (no padding, no
  dropped remainder): the last global batch is split unevenly, and one smaller than the number of
  ranks is merged into the one before it, so every rank has at least one example in every step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def active() -> bool:
    """True inside a torch.distributed process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_batches(order: torch.Tensor, batch_size: int, world: int) -> list[torch.Tensor]:
    """Split an epoch's shuffled example indices into global batches of ``batch_size * world``.

    Every index appears exactly once. A last batch with fewer than ``world`` examples joins the
    previous one (so each rank gets at least one example per step); ``order`` must hold >= ``world``.
    """
    if len(order) < world:
        raise ValueError(f"{len(order)} training examples cannot be shared by {world} workers")
    size = batch_size * world
    batches = list(torch.split(order, size))
    if len(batches) > 1 and len(batches[-1]) < world:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    return torch.tensor_split(batch, world)[rank]


def loss_scale(local: int, global_size: int, world: int) -> float:
    """Factor on a rank's mean loss so that averaging the ranks' gradients gives the gradient of the
    global batch's mean loss: ``world * local / global_size`` (1 for equal slices)."""
    return world * local / global_size


@torch.no_grad()
def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s (a no-op outside a process group)."""
    if not active():
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src)


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average floating buffers (BatchNorm running mean/var) across ranks; integer buffers
    (``num_batches_tracked``) take rank 0's value. No-op outside a process group."""
    if not active():
        return
    world = dist.get_world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world
        else:
            dist.broadcast(buffer, 0)


def allreduce_gradients(model: nn.Module) -> None:
    """Average gradients over ranks in one flat all-reduce (a no-op outside a process group).
    A parameter without a gradient on this rank (an unsampled candidate) contributes zeros."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (epoch metrics: what every rank saw, not rank 0's share)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the same sum of the incoming gradients -- itself through this
    Function, so the result can be differentiated twice (torch.distributed.nn's equivalent is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (see :class:`_AllReduceSum`)."""
    return _AllReduceSum.apply(tensor)


class _GlobalBatchNormMixin:
    """BatchNorm whose training-mode statistics are those of the global batch across ranks.

    Two passes (mean, then the mean squared deviation) rather than E[x^2] - E[x]^2, which loses
    digits when activations have a large mean. Eval mode, and training outside a process group,
    are plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = x.numel() // x.shape[1]
        count = _all_reduce_sum(x.new_tensor([float(local_count)]))
        mean = _all_reduce_sum(x.sum(dims)) / count
        centered = x - mean.view(shape)
        var = _all_reduce_sum((centered * centered).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """What ``F.batch_norm`` does in training: momentum (or cumulative) average, unbiased variance."""
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


class GlobalBatchNorm1d(_GlobalBatchNormMixin, nn.BatchNorm1d):
    """:class:`nn.BatchNorm1d` over the global batch."""


class GlobalBatchNorm2d(_GlobalBatchNormMixin, nn.BatchNorm2d):
    """:class:`nn.BatchNorm2d` over the global batch."""


class GlobalBatchNorm3d(_GlobalBatchNormMixin, nn.BatchNorm3d):
    """:class:`nn.BatchNorm3d` over the global batch."""


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def sync_batchnorm_(model: nn.Module) -> int:
    """Make every BatchNorm layer of ``model`` normalise over the global batch (in place; parameters,
    buffers and ``state_dict`` keys unchanged). Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm) and type(module) in _GLOBAL:
            module.__class__ = _GLOBAL[type(module)]
            switched += 1
    return switched
