"""Small layers shared by the model definitions."""

from __future__ import annotations

import torch
from torch import nn

from sors import kernels


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so attacks operate on [0, 1] pixels."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def default_stats(in_channels: int, mean=None, std=None):
    """Normalisation statistics: the given ones, else 0.5/0.5 per channel (maps [0,1] to [-1,1])."""
    mean = tuple(mean) if mean is not None else (0.5,) * in_channels
    std = tuple(std) if std is not None else (0.5,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    return mean, std


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same values) whose input gradient, for a first layer on
    the CPU (at most 4 input channels, stride 1), runs through :func:`sors.kernels.conv2d`: the
    op that SORS training differentiates twice and every gradient attack calls each step."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return kernels.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
