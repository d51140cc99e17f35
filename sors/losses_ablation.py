"""Ablation variants of the SORS loss: the step of :func:`sors.losses.sors_loss` with each fast path
switchable, and the first (einsum) orthogonality loss. Same values as the reference
(:func:`sors.losses.sors_loss_reference`), different cost: ``sors bench``'s ``fastpaths`` case times
them and the tests check they agree."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sors import kernels, losses


def einsum_orthogonality(grads: torch.Tensor) -> torch.Tensor:
    """The first implementation of the orthogonality loss (all pairs by einsum), for the ablation."""
    flat = grads.flatten(2)
    unit = flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-12)
    k = unit.shape[0]
    cos = torch.einsum("ibd,jbd->ijb", unit, unit)
    i, j = torch.triu_indices(k, k, offset=1)
    return cos[i, j].pow(2).mean(dim=1).sum()


def sors_step_variant(
    model,
    x,
    y,
    paths,
    params,
    opt,
    lam=10.0,
    routing="blocks",
    fast_conv=True,
    params_only=True,
    ortho=losses.orthogonality_loss,
) -> None:
    """The SORS step with each fast path switchable (same values, different cost)."""
    opt.zero_grad(set_to_none=True)
    k, b = paths.shape[0], x.shape[0]
    with kernels.fast_input_gradients(fast_conv):  # decided at forward time, kept by the graph
        stacked = x.detach().repeat(k, 1, 1, 1).requires_grad_()
        logits = (
            model.forward_blocks(stacked, paths)
            if routing == "blocks"
            else model(stacked, paths.repeat_interleave(b, dim=0))
        )
    ce = F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, b).mean(1).sum()
    grads = torch.autograd.grad(ce, stacked, create_graph=True)[0]
    total = ce + lam * ortho(grads.view(k, b, *x.shape[1:]))
    torch.autograd.backward(total, inputs=params if params_only else None)
    opt.step()


FAST_PATH_VARIANTS: dict[str, dict[str, Any]] = {
    "all fast paths": {},
    "sorted per-example routing": {"routing": "sort"},
    "built-in first-conv input gradient": {"fast_conv": False},
    "backward also w.r.t. the input": {"params_only": False},
    "einsum orthogonality loss": {"ortho": einsum_orthogonality},
}
