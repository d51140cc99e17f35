"""Gradient orthogonality of a trained model (the paper's Fig. 6): angles between input gradients of
random pairs of sub-networks (super-networks) or of ensemble members."""

from __future__ import annotations

import torch
from torch import nn

from sors import data as data_lib
from sors import metrics
from sors.models.supernet import SuperNet


def pair_cosines(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n_pairs: int = 8, seed: int = 0
) -> list[float]:
    """Cosines between input gradients of random path pairs (or member pairs): one per example and
    pair. Empty for a single deterministic model. ``images``: (B, C, H, W) pixels in [0, 1]."""
    model.eval()
    if isinstance(model, SuperNet):
        cos = metrics.path_pair_cosines(model, images, labels, n_pairs, torch.Generator().manual_seed(seed))
    elif len(getattr(model, "members", [])) > 1:
        cos = metrics.model_pair_cosines(list(model.members), images, labels)
    else:
        return []
    return [float(c) for c in cos]


def measure(
    model: nn.Module, dataset: str, root: str | None, n_examples: int = 128, n_pairs: int = 8, seed: int = 0
) -> dict:
    """``{"cosines": [...], "mean_abs_cos": float | None}`` on ``n_examples`` test images of ``dataset``."""
    images, labels = data_lib.load(dataset, "test", root, n=n_examples, seed=seed)
    cosines = pair_cosines(model, images, labels, n_pairs, seed)
    mean_abs = sum(abs(c) for c in cosines) / len(cosines) if cosines else None
    return {"cosines": cosines, "mean_abs_cos": mean_abs}


def cross_orthogonality(
    source: nn.Module,
    target: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_examples: int = 64,
    seed: int = 0,
) -> float:
    """Table 1's gradient orthogonality between a transfer source and its target: 1 - mean |cos|
    between their input gradients on the first ``n_examples`` images ((B, C, H, W) in [0, 1]); one
    path draw each for randomized models. 0 for a model against itself (deterministic), 1 when
    every pair of gradients is orthogonal."""
    x, y = images[:n_examples], labels[:n_examples]
    device = next(iter(target.parameters())).device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        source.eval()
        target.eval()
        cos = metrics.model_pair_cosines([source, target], x.to(device), y.to(device))
    return float(1.0 - cos.abs().mean()) if len(cos) else float("nan")
