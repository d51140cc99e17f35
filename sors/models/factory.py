"""Build a model from a resolved :class:`sors.config.RunConfig` (the one place that maps config to model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sors import data as data_lib
from sors.errors import ConfigError, quote
from sors.models.ensemble import PathAverage, parse_members
from sors.models.registry import MODELS, build, check_name
from sors.models.supernet import FixedPath, SuperNet

if TYPE_CHECKING:  # the annotation only: sors.config looks model facts up in this package
    from sors.config import ModelConfig, RunConfig


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


# ---------------------------------------------------------------- size before building

BYTES_PER_PARAMETER = 4  # float32 weights


@dataclass(frozen=True)
class ModelSize:
    """What a model would allocate: parameters (all candidates of every choice layer, all ensemble
    members) and its float32 weights in bytes (optimizer state and activations come on top)."""

    parameters: int
    members: int

    @property
    def weight_bytes(self) -> int:
        return self.parameters * BYTES_PER_PARAMETER


def _count(name: str, ds: data_lib.DatasetSpec, **options) -> int:
    """Parameters of one model, built on the meta device (shapes only: no memory for the weights)."""
    with torch.device("meta"):
        model = build(name, ds.num_classes, ds.in_channels, **options)
    return sum(p.numel() for p in model.parameters())


def _member_parameters(name: str, ds: data_lib.DatasetSpec, n_ops: int | None) -> int:
    """Parameters of one model with ``n_ops`` candidates per choice layer. The count is linear in
    ``n_ops`` (each candidate is the same operator), so it is measured at 1 and 2 and extrapolated:
    a million candidates are counted without building a million modules."""
    if n_ops is None or n_ops <= 2:
        return _count(name, ds, n_ops=n_ops)
    one, two = _count(name, ds, n_ops=1), _count(name, ds, n_ops=2)
    return one + (n_ops - 1) * (two - one)


def member_names(model: ModelConfig) -> list[str]:
    """The models an ensemble is made of (every name checked against the registry), or ``[model.name]``."""
    check_name(model.name)
    if model.name != "ensemble":
        return [model.name]
    names = parse_members(model.members or "lenet5*2")
    for name in sorted(set(names)):
        if name not in MODELS or name == "ensemble":
            raise ConfigError(
                "model.members",
                f"unknown member model {quote(name)}",
                ", ".join(n for n in MODELS.available() if n != "ensemble"),
            )
    return names


def model_size(cfg: RunConfig) -> ModelSize:
    """:class:`ModelSize` of the model ``cfg`` describes, without allocating it; raises
    :class:`ConfigError` for an unknown model or member, or an option the model does not take."""
    ds = data_lib.spec(cfg.data.name)
    names = member_names(cfg.model)
    if cfg.model.name != "ensemble":
        extra = {"members": cfg.model.members} if cfg.model.members else {}
        per_name = {
            cfg.model.name: _member_parameters(cfg.model.name, ds, cfg.model.n_ops)
            if not extra
            else _count(cfg.model.name, ds, n_ops=cfg.model.n_ops, **extra)
        }
    else:
        per_name = {name: _member_parameters(name, ds, cfg.model.n_ops) for name in set(names)}
    return ModelSize(parameters=sum(per_name[name] for name in names), members=len(names))
