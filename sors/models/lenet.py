"""LeNet-5 for 28x28 inputs (no padding) and its super-network SORS-LeNet-5 (paper Fig. 4)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from sors.models.layers import Conv2d, Normalize, default_stats
from sors.models.registry import register
from sors.models.supernet import ChoiceLayer, SuperNet

# (kind, in, out): conv 6@5x5, pool, conv 16@5x5, pool, 256 -> 120 -> 84 -> classes
_LAYERS = (("conv", None, 6), ("conv", 6, 16), ("fc", 256, 120), ("fc", 120, 84), ("fc", 84, None))


def _lenet_body(in_channels: int, num_classes: int, mean, std, wrap: Callable[[Callable[[], nn.Module]], nn.Module]):
    """The LeNet-5 layer stack; ``wrap(make)`` turns each weight layer's factory into a module
    (the layer itself for LeNet-5, a choice layer of m copies for SORS-LeNet-5)."""

    def weight_layer(kind, c_in, c_out):
        c_in = in_channels if c_in is None else c_in
        c_out = num_classes if c_out is None else c_out
        return wrap(lambda: Conv2d(c_in, c_out, 5) if kind == "conv" else nn.Linear(c_in, c_out))

    conv1, conv2, fc1, fc2, fc3 = (weight_layer(*spec) for spec in _LAYERS)
    return nn.Sequential(
        Normalize(*default_stats(in_channels, mean, std)),
        conv1,
        nn.ReLU(),
        nn.MaxPool2d(2),
        conv2,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        fc1,
        nn.ReLU(),
        fc2,
        nn.ReLU(),
        fc3,
    )


class LeNet5(nn.Module):
    """LeNet-5: (B, C, 28, 28) pixels in [0, 1] -> logits (B, classes). 44,426 parameters for C=1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=None, std=None):
        super().__init__()
        self.body = _lenet_body(in_channels, num_classes, mean, std, wrap=lambda make: make())

    def forward(self, x):
        return self.body(x)


class SORSLeNet5(SuperNet):
    """SORS-LeNet-5: LeNet-5's depth with ``n_ops`` same-shape candidates per weight layer (m^5 paths)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, n_ops: int = 4, mean=None, std=None):
        super().__init__()
        self.body = _lenet_body(
            in_channels, num_classes, mean, std, wrap=lambda make: ChoiceLayer([make() for _ in range(n_ops)])
        )
        self._register_choices()


@register("lenet5", randomized=False)
def lenet5(num_classes=10, in_channels=1, **options):
    return LeNet5(num_classes, in_channels, **options)


@register("sors_lenet5", randomized=True, super_network=True)
def sors_lenet5(num_classes=10, in_channels=1, n_ops=4, **options):
    return SORSLeNet5(num_classes, in_channels, n_ops=n_ops, **options)
