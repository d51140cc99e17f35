"""Model registry, timm-style: ``@register("name")`` on a builder, ``build(name, **kw)`` to make one."""

from __future__ import annotations

from typing import Callable

from torch import nn

from sors.errors import ConfigError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: make ``builder(num_classes, in_channels, **options)`` available as ``build(name)``."""
    def wrap(builder):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} registered twice")
        _BUILDERS[name] = builder
        return builder
    return wrap


def available() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def check_name(name: str) -> None:
    """Raise :class:`ConfigError` naming ``model.name`` when ``name`` is not registered."""
    if name not in _BUILDERS:
        raise ConfigError("model.name", f"unknown model {name!r}", ", ".join(available()))


def build(name: str, num_classes: int = 10, in_channels: int = 1, **options) -> nn.Module:
    """Build a registered model. Inputs of every model are pixels in [0, 1]; each model normalises
    internally (``mean``/``std`` options, per channel). Returns logits (B, num_classes)."""
    check_name(name)
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("n_ops", 1) < 1:
        raise ConfigError("model.n_ops", f"m = {options['n_ops']} candidates per layer", "an integer >= 1")
    try:
        return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        option = str(err).split("'")[-2]
        raise ConfigError(f"model.{option}", f"not an option of model {name!r}", "leave it unset for this model") from None
