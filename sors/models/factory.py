"""Build a model from a resolved :class:`sors.config.RunConfig` (the one place that maps config to model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from sors import data as data_lib
from sors.models.ensemble import PathAverage
from sors.models.registry import build
from sors.models.supernet import FixedPath, SuperNet

if TYPE_CHECKING:  # the annotation only: sors.config looks model facts up in this package
    from sors.config import RunConfig


def build_from_config(cfg: RunConfig) -> nn.Module:
    """The model ``cfg.model`` describes, sized and normalised for ``cfg.data``.

    RS*/SORS* (``model.average_paths > 1``) wrap the super-network in :class:`PathAverage`.
    """
    ds = data_lib.spec(cfg.data.name)
    options = {"n_ops": cfg.model.n_ops, "members": cfg.model.members, "mean": ds.mean, "std": ds.std}
    model = build(cfg.model.name, ds.num_classes, ds.in_channels, **options)
    return wrap_average(model, cfg.model.average_paths)


def wrap_average(model: nn.Module, k: int) -> nn.Module:
    """``PathAverage(model, k)`` for a super-network with k > 1, else the model itself."""
    return PathAverage(model, k) if k > 1 and isinstance(model, SuperNet) else model


def is_randomized(model: nn.Module) -> bool:
    """True when two forwards of the same input may differ (super-networks, RSE, wrappers of them);
    False for a super-network frozen on one path."""
    if isinstance(model, FixedPath):
        return False
    return any(isinstance(m, SuperNet) or getattr(m, "randomized", False) for m in model.modules())
