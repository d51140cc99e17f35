"""Model registry, timm-style: ``@register("name")`` on a builder, ``build(name, **kw)`` to make one."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from sors.errors import ConfigError
from sors.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model.name")
# @register("name", randomized=..., super_network=...) on ``builder(num_classes, in_channels, **options)``.
# Facts: ``randomized`` (its forward draws a random sub-network: SORS super-networks, RSE), ``super_network``
# (a :class:`SuperNet`: choice layers, ``num_paths``; trains K paths per step). ``num_paths`` is not a fact:
# it depends on ``n_ops`` and the data set, and every built super-network exposes it.
register = MODELS.register
available = MODELS.available
check_name = MODELS.check_name


def info(name: str) -> dict[str, Any]:
    """The registered facts of model ``name`` with defaults filled: ``randomized``, ``super_network``
    (booleans). :class:`ConfigError` on ``model.name`` for an unknown name."""
    return {"randomized": False, "super_network": False, **MODELS.facts(name)}


def build(name: str, num_classes: int = 10, in_channels: int = 1, **options) -> nn.Module:
    """Build a registered model. Inputs of every model are pixels in [0, 1]; each model normalises
    internally (``mean``/``std`` options, per channel). Returns logits (B, num_classes)."""
    builder = MODELS[name]
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("n_ops", 1) < 1:
        raise ConfigError("model.n_ops", f"m = {options['n_ops']} candidates per layer", "an integer >= 1")
    try:
        return builder(num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        option = str(err).split("'")[-2]
        raise ConfigError(
            f"model.{option}", f"not an option of model {name!r}", "leave it unset for this model"
        ) from None
