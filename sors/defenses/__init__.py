"""Input-transform defenses (Table 7), composable in front of any model:
``sors.defenses.build(name, model, **options) -> nn.Module``.

Names: ``median`` (median smoothing, ``kernel`` 2), ``bit_depth`` (``bits`` 5), ``jpeg``
(``quality`` 75), ``dnn_jpeg`` (DNN-oriented JPEG / Feature Distillation: ``quality`` 50,
``band`` 5, ``qs`` 40).

Two settings, as in the literature on adaptive attacks:
- gray-box: the attack is crafted on the undefended model (``defended.model``) and scored on the
  defended one: a transfer cell (``transfer_pgd`` with ``source_model=defended.model``);
- white-box with BPDA (Athalye et al. 2018): the attack runs on the defended model; transforms
  without a useful gradient (rounding: bit depth, JPEG) are the identity on the backward pass.
  ``bpda=False`` keeps their true, all-zero gradient (a gradient-masked model, useful to test the
  sanity checks).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sors.defenses import transforms
from sors.errors import ConfigError
from sors.registry import Registry

DEFENSES: Registry[tuple[Callable[..., torch.Tensor], dict, bool]] = Registry("defense", "defense.name")
available = DEFENSES.available


def register(name: str, fn: Callable[..., torch.Tensor], defaults: dict, differentiable: bool) -> None:
    """Register transform ``fn(x, **options)`` under ``name``; ``differentiable``: whether its own
    gradient is useful (else BPDA applies)."""
    DEFENSES.add(name, (fn, defaults, differentiable))


register("median", transforms.median_smooth, {"kernel": 2}, differentiable=True)
register("bit_depth", transforms.bit_depth, {"bits": 5}, differentiable=False)
register("jpeg", transforms.jpeg_compress, {"quality": 75, "subsample": True}, differentiable=False)
register(
    "dnn_jpeg", transforms.dnn_jpeg, {"quality": 50, "band": 5, "qs": 40.0, "subsample": False}, differentiable=False
)


class InputTransform(nn.Module):
    """A registered transform as a module: (B, C, H, W) in [0, 1] -> same shape in [0, 1].

    ``bpda``: for non-differentiable transforms, the backward pass is the identity (straight-through);
    ``False`` keeps the true gradient (zero almost everywhere for rounding).
    """

    def __init__(self, name: str, bpda: bool = True, **options):
        super().__init__()
        fn, defaults, differentiable = DEFENSES[name]
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ConfigError(
                f"defense.{unknown[0]}", f"not an option of defense {name!r}", ", ".join(sorted(defaults))
            )
        self.name, self.fn, self.differentiable, self.bpda = name, fn, differentiable, bool(bpda)
        self.options = {**defaults, **options}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, **self.options)
        if self.differentiable or not self.bpda:
            return out
        return x + (out - x).detach()  # BPDA: forward = transform, backward = identity

    def extra_repr(self) -> str:
        return f"{self.name}, bpda={self.bpda}, " + ", ".join(f"{k}={v}" for k, v in self.options.items())


class Defended(nn.Module):
    """``model(transform(x))``. ``forward(x, *args)`` passes extra arguments (a path) to the model.
    ``.model`` is the undefended model (the gray-box attacker's target)."""

    def __init__(self, transform: InputTransform, model: nn.Module):
        super().__init__()
        self.transform = transform
        self.model = model

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.model(self.transform(x), *args)


def build(name: str, model: nn.Module, bpda: bool = True, **options) -> Defended:
    """``model`` behind the input transform ``name`` (options: see :func:`available` and the module
    docstring). Unknown names/options raise :class:`ConfigError`."""
    return Defended(InputTransform(name, bpda=bpda, **options), model)


__all__ = ["available", "build", "Defended", "InputTransform", "register", "transforms"]
