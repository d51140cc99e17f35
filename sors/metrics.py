"""Metrics: accuracy with confidence intervals, and gradient orthogonality (Table 1, Fig. 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sors.models.supernet import SuperNet


def wilson_interval(accuracy: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion ``accuracy`` measured on ``n`` examples.

    Used for the mean over repeated path draws too: per-example scores in [0, 1] have variance at
    most p(1-p), so the interval is conservative there.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(accuracy, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path=None) -> torch.Tensor:
    """dCE/dx per example, (B, C, H, W); ``path`` is passed to super-networks."""
    inp = x.detach().clone().requires_grad_(True)
    out = model(inp, path) if path is not None else model(inp)
    return torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), inp)[0]


def cosine_per_example(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between matching rows of two (B, ...) tensors: (B,)."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def path_pair_cosines(
    model: SuperNet, x: torch.Tensor, y: torch.Tensor, n_pairs: int = 8, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Cosines between input gradients of random *distinct* path pairs: (n_pairs * B,)."""
    cosines = []
    for _ in range(n_pairs):
        first = model.sample_path(generator)
        second = model.sample_path(generator)
        while model.num_paths > 1 and torch.equal(first, second):
            second = model.sample_path(generator)
        cosines.append(cosine_per_example(input_gradient(model, x, y, first), input_gradient(model, x, y, second)))
    return torch.cat(cosines)


def model_pair_cosines(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosines between input gradients of every pair of models (ensemble members, or a transfer
    source against targets): (pairs * B,)."""
    grads = [input_gradient(m, x, y) for m in models]
    pairs = [(i, j) for i in range(len(grads)) for j in range(i + 1, len(grads))]
    return torch.cat([cosine_per_example(grads[i], grads[j]) for i, j in pairs])


def gradient_orthogonality(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_pairs: int = 8, generator: torch.Generator | None = None
) -> dict[str, float] | None:
    """Mean |cos| and cos^2 between input gradients of random path pairs (super-networks) or of
    ensemble members; None for a single deterministic model."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, SuperNet):
            cos = path_pair_cosines(model, x, y, n_pairs, generator)
        elif len(getattr(model, "members", [])) > 1:
            cos = model_pair_cosines(list(model.members), x, y)
        else:
            return None
    finally:
        model.train(was_training)
    return {"grad_abs_cos": cos.abs().mean().item(), "grad_cos2": cos.pow(2).mean().item()}
