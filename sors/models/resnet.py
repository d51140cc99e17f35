"""CIFAR-style ResNet-18/34 (3x3 stem, no max-pool) and SORS-ResNet-18 (paper Fig. 5).

In a SORS residual block the first conv is a choice of ``n_ops`` 3x3 candidates and the second
a choice of candidates with kernels ``kernels2`` (default 3, 5, 7); GroupNorm follows every conv
instead of BatchNorm, because BN's running statistics are meaningless across sampled paths.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sors.models.layers import Conv2d, Normalize, default_stats, group_norm
from sors.models.registry import register
from sors.models.supernet import ChoiceLayer, SuperNet

NORMS: dict[str, Callable[[int], nn.Module]] = {"batch": nn.BatchNorm2d, "group": group_norm}


def conv_norm(c_in: int, c_out: int, kernel: int, stride: int, norm: str) -> nn.Sequential:
    """conv (same padding, no bias) followed by a normalisation layer."""
    return nn.Sequential(Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), NORMS[norm](c_out))


class ResidualBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)); conv1/conv2 include their normalisation."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


def _resnet_body(depths, in_channels, num_classes, width, norm, mean, std, make_block) -> nn.Sequential:
    """Stem, four stages of residual blocks (``make_block(c_in, c_out, stride)``), pool, classifier."""
    layers: list[nn.Module] = [
        Normalize(*default_stats(in_channels, mean, std)),
        conv_norm(in_channels, width, 3, 1, norm),
        nn.ReLU(),
    ]
    c_in = width
    for stage, depth in enumerate(depths):
        c_out = width * 2**stage
        for i in range(depth):
            layers.append(make_block(c_in, c_out, 2 if (i == 0 and stage > 0) else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _shortcut(c_in: int, c_out: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return conv_norm(c_in, c_out, 1, stride, norm)


class ResNet(nn.Module):
    """Plain CIFAR ResNet: (B, C, H, W) pixels in [0, 1] -> logits."""

    def __init__(self, depths, num_classes=10, in_channels=3, width=64, norm="batch", mean=None, std=None):
        super().__init__()

        def block(c_in, c_out, stride):
            return ResidualBlock(
                conv_norm(c_in, c_out, 3, stride, norm),
                conv_norm(c_out, c_out, 3, 1, norm),
                _shortcut(c_in, c_out, stride, norm),
            )

        self.body = _resnet_body(depths, in_channels, num_classes, width, norm, mean, std, block)

    def forward(self, x):
        return self.body(x)


class SORSResNet(SuperNet):
    """SORS-ResNet: every residual block's convs are choice layers; GroupNorm throughout."""

    def __init__(
        self, depths, num_classes=10, in_channels=3, width=64, n_ops=4, kernels2=(3, 5, 7), mean=None, std=None
    ):
        super().__init__()
        kernels2 = tuple(kernels2)

        def block(c_in, c_out, stride):
            conv1 = ChoiceLayer([conv_norm(c_in, c_out, 3, stride, "group") for _ in range(n_ops)])
            conv2 = ChoiceLayer([conv_norm(c_out, c_out, k, 1, "group") for k in kernels2])
            return ResidualBlock(conv1, conv2, _shortcut(c_in, c_out, stride, "group"))

        self.body = _resnet_body(depths, in_channels, num_classes, width, "group", mean, std, block)
        self._register_choices()


@register("resnet18", randomized=False)
def resnet18(num_classes=10, in_channels=3, **options):
    return ResNet((2, 2, 2, 2), num_classes, in_channels, **options)


@register("resnet34", randomized=False)
def resnet34(num_classes=10, in_channels=3, **options):
    return ResNet((3, 4, 6, 3), num_classes, in_channels, **options)


@register("sors_resnet18", randomized=True, super_network=True)
def sors_resnet18(num_classes=10, in_channels=3, **options):
    return SORSResNet((2, 2, 2, 2), num_classes, in_channels, **options)
