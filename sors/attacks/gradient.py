"""Gradient-sign attacks under an L-inf budget: FGSM, PGD, MIM, and the adaptive variants for
randomized models (Table 9's gradient-ensemble PGD and EOT-PGD), plus the identity attack ``none``.

All use the cross-entropy loss summed over the batch, so an example's gradient does not depend on
the batch it is in. With a randomized model each forward draws a fresh path for the batch (as the
deployed model would), except EOT-PGD, which draws one path per example per sample.
"""

from __future__ import annotations

import torch
from torch import nn

from sors.attacks.base import LOSSES, Attack, ce_gradient, linf_box, project_linf, register
from sors.errors import ConfigError
from sors.models.supernet import per_example_sampling, repeat_forward


def eot_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int,
    batched: bool = True,
    loss: str = "ce",
    max_batch: int | None = None,
) -> torch.Tensor:
    """Mean input gradient over ``samples`` random draws of the model: (B, C, H, W).

    ``batched``: the draws run as ONE forward over ``samples`` stacked copies of the batch, with one
    path per example (:func:`per_example_sampling`), split into chunks of at most ``max_batch``
    images when given. Otherwise ``samples`` sequential forwards, each with one path for the batch
    (the paper's gradient-ensemble attack). ``samples == 1`` is exactly one plain forward.
    """
    if samples == 1:
        return ce_gradient(model, x, y, loss)
    if not batched:
        return sum(ce_gradient(model, x, y, loss) for _ in range(samples)) / samples
    copies_per_chunk = samples if not max_batch else max(1, min(samples, max_batch // x.shape[0]))
    total = torch.zeros_like(x)
    with per_example_sampling(model):
        for start in range(0, samples, copies_per_chunk):
            copies = min(copies_per_chunk, samples - start)
            inp = x.detach().requires_grad_(True)
            out = repeat_forward(model, inp, copies)  # = model(inp.repeat(copies, ...)), shared layers once
            value = LOSSES[loss](out, y.repeat(copies)).sum()
            total += torch.autograd.grad(value, inp)[0]
    return total / samples


@register("none", label="Clean", order=0)
class NoAttack(Attack):
    """Identity: clean accuracy as a cell like any other."""

    name = "none"
    norm = "none"
    defaults = {}

    @property
    def spec(self):
        return {"name": self.name, "norm": self.norm, "eps": 0.0, "steps": None, "eot_samples": None}

    def perturb(self, x, y):
        return x.clone()

    def project(self, adv, x):
        return adv


class _SignAttack(Attack):
    """Shared option handling for the sign-gradient family."""

    batched_eot = True

    def validate(self) -> None:
        super().validate()
        step = self.options.get("step_size")
        if step is not None and not (isinstance(step, (int, float)) and step >= 0):
            raise ConfigError(
                "attack.step_size", f"{step!r}", "a number >= 0 on the pixel scale, or none for the default"
            )
        if self.options.get("loss", "ce") not in LOSSES:
            raise ConfigError("attack.loss", f"unknown loss {self.options['loss']!r}", ", ".join(LOSSES))

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return eot_gradient(
            self.model,
            x,
            y,
            self.options.get("eot_samples") or 1,
            self.batched_eot,
            self.options.get("loss", "ce"),
            self.options.get("max_batch"),
        )


@register("fgsm", label="FGSM", order=10)
class FGSM(_SignAttack):
    """Fast gradient sign method: one step of size eps along sign(dCE/dx), clipped to [0, 1]."""

    name = "fgsm"
    defaults = {"eot_samples": 1, "loss": "ce", "max_batch": None}

    @property
    def spec(self):
        return {**super().spec, "steps": 1}

    def perturb(self, x, y):
        return (x + self.eps * self.gradient(x, y).sign()).clamp(0.0, 1.0)


@register("pgd", label="PGD", order=20, iterative=True)
class PGD(_SignAttack):
    """Projected gradient descent (Madry et al.): ``steps`` sign steps of ``step_size`` (default
    eps * ``step_fraction``; paper: 7 steps of eps/4), each projected onto the eps-ball and [0, 1].
    ``random_start`` starts from a uniform point of the ball (off by default, as in the paper)."""

    name = "pgd"
    defaults = {
        "steps": 7,
        "step_size": None,
        "step_fraction": 0.25,
        "random_start": False,
        "eot_samples": 1,
        "loss": "ce",
        "max_batch": None,
    }

    @property
    def step_size(self) -> float:
        step = self.options.get("step_size")
        return float(step) if step is not None else self.eps * self.options["step_fraction"]

    @property
    def spec(self):
        return {**super().spec, "step_size": self.step_size}

    def start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.options.get("random_start"):
            return x.clone()
        return project_linf(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)

    def perturb(self, x, y):
        low, high = linf_box(x, self.eps)
        adv = self.start(x)
        for _ in range(self.options["steps"]):
            adv = torch.clamp(adv.add_(self.gradient(adv, y).sign_(), alpha=self.step_size), low, high)
        return adv


@register("eot_pgd", label="EOT-PGD", order=60, randomized_only=True, iterative=True)
class EOTPGD(PGD):
    """PGD whose every step follows the gradient averaged over ``eot_samples`` (default 20) random
    draws of the model (expectation over transformation, Athalye et al. 2018). The draws run as one
    batched forward with one path per example; ``max_batch`` caps the images per forward."""

    name = "eot_pgd"
    defaults = {**PGD.defaults, "eot_samples": 20}


@register("ensemble_pgd", label="ens-PGD", order=50, randomized_only=True, iterative=True)
class EnsemblePGD(PGD):
    """The paper's gradient-ensemble adaptive attack (Table 9): each PGD step follows the mean
    gradient of ``eot_samples`` (k, the table's 2..5; default 5) sub-networks sampled for the batch,
    run as k sequential forwards."""

    name = "ensemble_pgd"
    batched_eot = False
    defaults = {**PGD.defaults, "eot_samples": 5}


@register("mim", label="MIM", order=30, iterative=True)
class MIM(PGD):
    """Momentum iterative FGSM (Dong et al. 2018): ``steps`` (10) sign steps of eps/10 along the
    accumulated L1-normalised gradient, momentum ``decay`` 1.0."""

    name = "mim"
    defaults = {**PGD.defaults, "steps": 10, "step_fraction": 0.1, "decay": 1.0}

    def perturb(self, x, y):
        low, high = linf_box(x, self.eps)
        adv = self.start(x)
        momentum = torch.zeros_like(x)
        for _ in range(self.options["steps"]):
            grad = self.gradient(adv, y)
            scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            momentum = grad / scale + self.options["decay"] * momentum
            adv = torch.clamp(adv.add_(momentum.sign(), alpha=self.step_size), low, high)
        return adv
