"""Carlini & Wagner L2 attack (Carlini and Wagner, S&P 2017), untargeted, unbounded distortion.

Minimises ||x' - x||_2^2 + c * max(z_y - max_{j!=y} z_j + kappa, 0) over x' = (tanh(w) + 1) / 2
with Adam, and binary-searches c per example. Returns, per example, the smallest-L2 adversarial
image found, or the original image when every c failed: "a sample counts as correct when the
attack fails", as in the paper. Paper settings: kappa 0 (MNIST, CIFAR-10) or 1 (CIFAR-100);
10,000 iterations on MNIST-like data, 100 on CIFAR.
"""

from __future__ import annotations

import torch

from sors.attacks.base import Attack, margin_loss, register
from sors.errors import ConfigError

# Paper defaults by data set family: (iterations, kappa).
PAPER_DEFAULTS = {"mnist": (10000, 0.0), "fashion_mnist": (10000, 0.0), "cifar10": (100, 0.0), "cifar100": (100, 1.0)}


@register("cw", label="C&W", order=40, unbounded=True)
class CarliniWagnerL2(Attack):
    """C&W-L2. Options: ``steps`` (Adam iterations per binary-search step; None: 10000 on
    MNIST-like data, 100 on CIFAR), ``kappa`` (confidence; None: 1 on CIFAR-100, else 0), ``lr``
    (1e-2), ``binary_search_steps`` (9), ``initial_const`` (1e-3), ``abort_early`` (True).
    ``eps`` is recorded but not used (the distortion is unbounded). ``last_stats`` holds the mean
    L2 of the successful examples of the last call."""

    name = "cw"
    norm = "l2"
    defaults = {
        "steps": None,
        "kappa": None,
        "lr": 1e-2,
        "binary_search_steps": 9,
        "initial_const": 1e-3,
        "abort_early": True,
    }

    def validate(self) -> None:
        super().validate()
        if self.dataset is not None and self.dataset not in PAPER_DEFAULTS:
            raise ConfigError("attack.dataset", f"unknown data set {self.dataset!r}", ", ".join(PAPER_DEFAULTS))
        for key in ("lr", "initial_const"):
            if not self.options[key] > 0:
                raise ConfigError(f"attack.{key}", f"{self.options[key]!r}", "a number > 0")
        if not (isinstance(self.options["binary_search_steps"], int) and self.options["binary_search_steps"] >= 1):
            raise ConfigError(
                "attack.binary_search_steps", f"{self.options['binary_search_steps']!r}", "an integer >= 1"
            )
        if self.dataset is not None:
            self._resolve(self.dataset)

    def _resolve(self, dataset: str) -> None:
        steps, kappa = PAPER_DEFAULTS[dataset]
        if self.options["steps"] is None:
            self.options["steps"] = steps
        if self.options["kappa"] is None:
            self.options["kappa"] = kappa

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.options["steps"] is None or self.options["kappa"] is None:
            self._resolve("mnist" if x.shape[1] == 1 else "cifar10")
        batch = x.shape[0]
        const = torch.full((batch,), float(self.options["initial_const"]), device=x.device)
        lower, upper = torch.zeros_like(const), torch.full_like(const, 1e10)
        best_l2 = torch.full_like(const, float("inf"))
        best_adv = x.clone()
        w_start = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        for _ in range(self.options["binary_search_steps"]):
            success = self._optimise(x, y, w_start, const, best_l2, best_adv)
            upper = torch.where(success, torch.minimum(upper, const), upper)
            lower = torch.where(success, lower, torch.maximum(lower, const))
            # bisect once an upper bound exists; until then grow c tenfold (as the reference code)
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        found = torch.isfinite(best_l2)
        self.last_stats = {
            "success_rate": found.float().mean().item(),
            "mean_l2": best_l2[found].sqrt().mean().item() if found.any() else float("nan"),
        }
        return best_adv

    def _optimise(self, x, y, w_start, const, best_l2, best_adv) -> torch.Tensor:
        """One binary-search step at constants ``const`` (B,); updates best_l2/best_adv in place and
        returns which examples succeeded at least once."""
        kappa, steps = float(self.options["kappa"]), int(self.options["steps"])
        w = w_start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.options["lr"])
        success = torch.zeros_like(const, dtype=torch.bool)
        previous, check_every = float("inf"), max(1, steps // 10)
        for step in range(steps):
            adv = (torch.tanh(w) + 1) / 2
            logits = self.model(adv)
            l2 = (adv - x).pow(2).flatten(1).sum(1)
            margin = margin_loss(logits, y)  # > 0 once misclassified
            loss = (l2 + const * (kappa - margin).clamp_min(0)).sum()
            w.grad = torch.autograd.grad(loss, w)[0]
            optimizer.step()
            with torch.no_grad():
                hit = (margin >= kappa) & (logits.argmax(1) != y)
                better = hit & (l2 < best_l2)
                best_l2[better] = l2[better]
                best_adv[better] = adv[better].detach()
                success |= hit
            if self.options["abort_early"] and (step + 1) % check_every == 0:
                if loss.item() > previous * 0.9999:
                    break
                previous = loss.item()
        return success
