"""The SORS objective (paper Eq. 4-7).

    L_total = sum_i CE(N_i(x), y) + lambda * sum_{i<j} mean_b cos^2(g_i[b], g_j[b]) + kd_weight * sum_i CE(N_i(x), p_teacher)

with g_i = dCE_i/dx per example (double backprop: the input gradients are computed with
``create_graph=True`` so the orthogonality term trains the weights).

The fast path runs the K sampled paths as *one* forward over K stacked copies of the batch with a
per-example path, and gets all K*B input gradients from one ``autograd.grad`` call. This is exact
for models in which examples do not interact (GroupNorm, no BatchNorm in training mode), which
holds for every ``sors_*`` model. :func:`sors_loss_reference` is the straightforward sequential
implementation, kept for equivalence tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sors.models.supernet import SuperNet


@dataclass
class LossParts:
    """Scalars of one step. ``total`` carries the graph; the rest are detached for logging."""

    total: torch.Tensor
    ce: torch.Tensor  # sum over paths of the batch-mean CE
    ortho: torch.Tensor  # sum over path pairs of the batch-mean cos^2 (before lambda)
    kd: torch.Tensor
    logits: torch.Tensor  # (K, B, C), detached
    weight_grads: tuple | None = None  # dCE/dtheta when computed together with the input gradients


def orthogonality_loss(grads: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} mean_b cos^2(g_i[b], g_j[b]) for input gradients ``grads`` of shape (K, B, ...).

    0 when every pair is orthogonal, K(K-1)/2 when all are parallel. Each norm is clamped at 1e-12
    (a zero gradient counts as orthogonal to everything).
    """
    # Pairwise dot products with elementwise mul+sum: an einsum over (K, B, D) lowers to a strided
    # bmm whose double backward costs more on CPU than the whole network's backward.
    flat = grads.flatten(2)
    sq = (flat * flat).sum(dim=2).clamp_min(1e-24)  # (K, B) squared norms, = max(norm, 1e-12)^2
    total = flat.new_zeros(())
    for i in range(flat.shape[0]):
        for j in range(i + 1, flat.shape[0]):
            dot = (flat[i] * flat[j]).sum(dim=1)
            total = total + (dot * dot / (sq[i] * sq[j])).mean()
    return total


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Batch-mean CE against a probability vector (distillation, Eq. 7): logits/probs (B, C)."""
    return -(target_probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def sample_paths(model: SuperNet, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K independent uniform paths: (K, L) long."""
    return torch.stack([model.sample_path(generator) for _ in range(k)])


def _distillation(logits: torch.Tensor, teacher_probs: torch.Tensor | None) -> torch.Tensor:
    if teacher_probs is None:
        return logits.new_zeros(())
    return sum(soft_cross_entropy(path_logits, teacher_probs) for path_logits in logits)


def sors_loss(
    model: SuperNet,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int = 2,
    lam: float = 10.0,
    teacher_probs: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    paths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight_grads: bool = False,
) -> LossParts:
    """The SORS loss for a batch, K paths in one batched forward.

    Args:
        model: a super-network (examples must not interact: no BatchNorm in train mode).
        x: (B, C, H, W) pixels in [0, 1]; y: (B,) labels.
        k: paths sampled for this step (ignored when ``paths`` (K, L) is given).
        lam: weight of the orthogonality term (0 skips the double backprop entirely).
        teacher_probs: (B, C) teacher softmax for distillation, or None.
        weight_grads: also return dCE/dtheta from the same backward that made the input
            gradients (the caller then backprops only ``lam * ortho + kd`` and adds them).

    Backprop ``total`` with ``torch.autograd.backward(total, inputs=params)`` (as
    :func:`sors.train.train_one_epoch` does): a plain ``total.backward()`` also differentiates
    with respect to the stacked input copy, which costs a third input-gradient pass.
    """
    paths = sample_paths(model, k, generator) if paths is None else torch.as_tensor(paths, dtype=torch.long)
    k, batch = paths.shape[0], x.shape[0]
    stacked = x.detach().repeat(k, 1, 1, 1).requires_grad_(lam > 0)
    logits = model.forward_blocks(stacked, paths)
    ce_each = F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, batch)
    ce = ce_each.mean(dim=1).sum()
    logits = logits.view(k, batch, -1)
    kd = _distillation(logits, teacher_probs)
    if lam == 0:
        return LossParts(ce + kd_weight * kd, ce.detach(), ce.new_zeros(()), kd.detach(), logits.detach())
    params = [p for p in model.parameters() if p.requires_grad] if weight_grads else []
    # d(sum_k mean_b CE)/dx: each example's slice is its own dCE/dx up to the factor 1/B, and cos is
    # scale-free. One call for all K*B input gradients.
    grads = torch.autograd.grad(ce, [stacked] + params, create_graph=True, allow_unused=weight_grads)
    ortho = orthogonality_loss(grads[0].view(k, batch, *x.shape[1:]))
    if weight_grads:
        extra = tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads[1:]))
        return LossParts(lam * ortho + kd_weight * kd, ce.detach(), ortho.detach(), kd.detach(), logits.detach(), extra)
    return LossParts(ce + lam * ortho + kd_weight * kd, ce.detach(), ortho.detach(), kd.detach(), logits.detach())


def backward_into(parts: LossParts, params: list[torch.Tensor], scale: float = 1.0) -> None:
    """Accumulate d(scale * parts.total)/d(params) into ``p.grad`` (plus ``scale * parts.weight_grads``
    when the loss returned them): the backward of a training step. ``scale``: a data-parallel rank's
    share of the global batch (``sors.distributed.loss_scale``); it multiplies the loss, not the
    gradients afterwards, because a global-batch BatchNorm carries other ranks' terms into them.

    ``params`` are the trainable parameters in ``model.parameters()`` order. Naming them as the only
    inputs keeps autograd from also differentiating with respect to the (stacked) input images,
    which for the SORS loss is one more input-gradient pass through the first layer.
    """
    torch.autograd.backward(parts.total if scale == 1.0 else parts.total * scale, inputs=params)
    for p, g in zip(params, parts.weight_grads or ()):
        g = g if scale == 1.0 else g * scale
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)


def sors_loss_reference(
    model: SuperNet,
    x: torch.Tensor,
    y: torch.Tensor,
    paths: torch.Tensor,
    lam: float = 10.0,
    teacher_probs: torch.Tensor | None = None,
    kd_weight: float = 1.0,
) -> LossParts:
    """Straightforward SORS loss: one forward and one ``autograd.grad(create_graph=True)`` per path,
    sequentially (the TRS/GAL-style implementation). Same value as :func:`sors_loss`."""
    logits, grads, ces = [], [], []
    for path in paths:
        inp = x.detach().clone().requires_grad_(lam > 0)
        out = model(inp, path)
        ce_i = F.cross_entropy(out, y)
        if lam > 0:
            grads.append(torch.autograd.grad(ce_i, inp, create_graph=True)[0])
        logits.append(out)
        ces.append(ce_i)
    logits_t = torch.stack(logits)
    ce = torch.stack(ces).sum()
    kd = _distillation(logits_t, teacher_probs)
    ortho = orthogonality_loss(torch.stack(grads)) if lam > 0 else ce.new_zeros(())
    return LossParts(ce + lam * ortho + kd_weight * kd, ce.detach(), ortho.detach(), kd.detach(), logits_t.detach())


def plain_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_probs: torch.Tensor | None = None,
    kd_weight: float = 1.0,
) -> LossParts:
    """CE (+ distillation) for models that do not sample paths. Ensembles train each member on its
    own CE, as independently initialised and trained models (paper Sec. 4.1)."""
    members = list(getattr(model, "members", [])) or [model]
    logits = torch.stack([member(x) for member in members])
    ce = sum(F.cross_entropy(member_logits, y) for member_logits in logits)
    kd = _distillation(logits, teacher_probs)
    return LossParts(ce + kd_weight * kd, ce.detach(), ce.new_zeros(()), kd.detach(), logits.detach())
