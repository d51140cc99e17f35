"""Gradient-orthogonality analysis (paper Table 1 and Fig. 6).

Cosines between input gradients of the cross-entropy loss, per example, for:

- random path pairs of a super-network (:func:`path_pairs`);
- the members of an ensemble, every pair (:func:`ensemble_members`);
- a transfer source against each target model (:func:`source_targets`).

Each result is a :class:`CosineHistogram`: numpy counts and bin edges over [-1, 1] (no plotting
here), the mean cosine, the mean |cos|, and ``orthogonality = 1 - mean |cos|`` (the paper's
"gradient orthogonality": 0 for a model against itself, as ResNet-152 in Table 1, 1 when
orthogonal). The gradients come from :mod:`sors.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from sors import metrics
from sors.attacks.base import eval_mode
from sors.models.ensemble import Ensemble
from sors.models.supernet import SuperNet


@dataclass
class CosineHistogram:
    """Histogram of per-example gradient cosines: ``counts`` (bins,), ``edges`` (bins + 1,)."""

    kind: str
    counts: np.ndarray
    edges: np.ndarray
    mean: float
    mean_abs: float
    n: int

    @property
    def orthogonality(self) -> float:
        """1 - mean |cos|: 0 for parallel gradients, 1 for orthogonal ones."""
        return 1.0 - self.mean_abs

    def to_dict(self) -> dict:
        """JSON-able: counts and edges as lists."""
        return {
            "kind": self.kind,
            "counts": self.counts.tolist(),
            "edges": self.edges.tolist(),
            "mean": self.mean,
            "mean_abs": self.mean_abs,
            "orthogonality": self.orthogonality,
            "n": self.n,
        }


def histogram(cosines: torch.Tensor, kind: str = "", bins: int = 40) -> CosineHistogram:
    """Histogram of ``cosines`` (any shape, values in [-1, 1]) over ``bins`` equal bins of [-1, 1]."""
    values = cosines.detach().flatten().double().clamp(-1.0, 1.0).cpu().numpy()
    counts, edges = np.histogram(values, bins=bins, range=(-1.0, 1.0))
    mean = float(values.mean()) if values.size else float("nan")
    mean_abs = float(np.abs(values).mean()) if values.size else float("nan")
    return CosineHistogram(kind, counts, edges, mean, mean_abs, int(values.size))


def path_pairs(
    model: SuperNet,
    x: torch.Tensor,
    y: torch.Tensor,
    n_pairs: int = 8,
    bins: int = 40,
    generator: torch.Generator | None = None,
) -> CosineHistogram:
    """Cosines between the input gradients of ``n_pairs`` random distinct path pairs, per example
    of (x, y): n_pairs * B values."""
    with eval_mode(model):
        cosines = metrics.path_pair_cosines(model, x, y, n_pairs, generator)
    return histogram(cosines, "paths", bins)


def ensemble_members(
    model: Ensemble | Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, bins: int = 40
) -> CosineHistogram:
    """Cosines between the input gradients of every pair of ensemble members: pairs * B values."""
    members = list(model.members) if isinstance(model, Ensemble) else list(model)
    if len(members) < 2:
        raise ValueError("need at least two ensemble members")
    with eval_mode(*members):
        cosines = metrics.model_pair_cosines(members, x, y)
    return histogram(cosines, "members", bins)


def source_targets(
    source: nn.Module,
    targets: dict[str, nn.Module] | Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    bins: int = 40,
) -> dict[str, CosineHistogram]:
    """For each target, the cosines between the source's input gradient and the target's (Table 1:
    transfer from a source model). Randomized targets use one path draw per call."""
    named = targets if isinstance(targets, dict) else {f"target{i}": t for i, t in enumerate(targets)}
    with eval_mode(source, *named.values()):
        source_grad = metrics.input_gradient(source, x, y)
        return {
            name: histogram(
                metrics.cosine_per_example(source_grad, metrics.input_gradient(target, x, y)), f"transfer:{name}", bins
            )
            for name, target in named.items()
        }


def analyze(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_pairs: int = 8,
    bins: int = 40,
    generator: torch.Generator | None = None,
) -> CosineHistogram | None:
    """Path pairs for a super-network (or a wrapper holding one as ``.supernet``), member pairs for
    an ensemble, None for a single deterministic model."""
    net = model if isinstance(model, SuperNet) else getattr(model, "supernet", None)
    if isinstance(net, SuperNet):
        return path_pairs(net, x, y, n_pairs, bins, generator)
    if isinstance(model, Ensemble) and len(model.members) > 1:
        return ensemble_members(model, x, y, bins)
    return None
