"""Wrappers that combine predictions: naive ensembles, RS*/SORS* path averaging, and RSE.

Each returns log-probabilities log(mean softmax), so argmax, cross-entropy and attacks work on
the output exactly as on logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sors.errors import ConfigError
from sors.models.registry import build, register
from sors.models.supernet import SuperNet


def mean_softmax_log(logits: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """log of the mean of softmaxes over the first dim / list: (k, B, C) -> (B, C)."""
    stacked = torch.stack(list(logits)) if isinstance(logits, (list, tuple)) else logits
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(stacked.shape[0])


def parse_members(members: str | list | tuple) -> list[str]:
    """``"lenet5*4"`` -> 4 x lenet5; ``"resnet18,resnet34"`` -> both."""
    if isinstance(members, (list, tuple)):
        return [str(m) for m in members]
    names: list[str] = []
    for part in str(members).split(","):
        name, _, count = part.strip().partition("*")
        try:
            names += [name.strip()] * (int(count) if count else 1)
        except ValueError:
            raise ConfigError(
                "model.members", f"bad count in {part!r}", "name or name*count, comma separated"
            ) from None
    if not names or "" in names:
        raise ConfigError("model.members", f"no member models in {members!r}", "e.g. lenet5*4 or resnet18,resnet34")
    return names


class Ensemble(nn.Module):
    """k independently initialised models; prediction = log of the mean softmax."""

    randomized = False

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_softmax_log([member(x) for member in self.members])


@register("ensemble", randomized=False)
def ensemble(num_classes=10, in_channels=1, members="lenet5*2", **options):
    names = parse_members(members)
    if "ensemble" in names:
        raise ConfigError("model.members", "an ensemble cannot contain an ensemble", "non-ensemble model names")
    return Ensemble([build(name, num_classes, in_channels, **options) for name in names])


class PathAverage(nn.Module):
    """RS* / SORS*: each forward averages the softmax of ``k`` paths sampled from ``supernet``.

    ``forward(x, path=None)``: ``path`` may be a (k, L) tensor of fixed paths.
    """

    randomized = True

    def __init__(self, supernet: SuperNet, k: int = 2):
        super().__init__()
        if k < 1:
            raise ConfigError("model.average_paths", f"{k}", "an integer >= 1")
        self.supernet = supernet
        self.k = k

    def forward(self, x: torch.Tensor, path: torch.Tensor | None = None) -> torch.Tensor:
        paths = [None] * self.k if path is None else list(torch.as_tensor(path))
        return mean_softmax_log([self.supernet(x, p) for p in paths])


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise, in training *and* inference (RSE's noise layer)."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.sigma > 0 else x


class RSE(nn.Module):
    """Random Self-Ensemble (Liu et al., ECCV 2018): a noise layer before every convolution
    (``init_noise`` before the first, ``inner_noise`` before the others); at inference the
    prediction averages the softmax of ``n_ensemble`` noisy passes."""

    randomized = True

    def __init__(self, base: nn.Module, init_noise: float = 0.2, inner_noise: float = 0.1, n_ensemble: int = 10):
        super().__init__()
        self.base = base
        self.n_ensemble = n_ensemble
        convs = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.Conv2d)]
        for i, (name, conv) in enumerate(convs):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, nn.Sequential(GaussianNoise(init_noise if i == 0 else inner_noise), conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.n_ensemble == 1:
            return self.base(x)
        # one batched call: n copies of the batch draw independent noise
        logits = self.base(x.repeat(self.n_ensemble, 1, 1, 1)).view(self.n_ensemble, x.shape[0], -1)
        return mean_softmax_log(logits)


@register("rse_lenet5", randomized=True)
def rse_lenet5(num_classes=10, in_channels=1, init_noise=0.2, inner_noise=0.1, n_ensemble=10, **options):
    return RSE(build("lenet5", num_classes, in_channels, **options), init_noise, inner_noise, n_ensemble)


@register("rse_resnet18", randomized=True)
def rse_resnet18(num_classes=10, in_channels=3, init_noise=0.2, inner_noise=0.1, n_ensemble=10, **options):
    return RSE(build("resnet18", num_classes, in_channels, **options), init_noise, inner_noise, n_ensemble)
