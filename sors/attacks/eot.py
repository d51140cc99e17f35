"""Adaptive gradient attacks for randomized models on the APGD engine (:mod:`sors.attacks.apgd`).

- ``eot_apgd``: APGD on the *expected softmax* over per-example path draws (loss
  ``expected_ce`` = -log E[p_y], or ``expected_margin``), 100 steps, 32 draws, 2 restarts.
- ``autoattack_rand``: AutoAttack's ``rand`` version (Croce & Hein 2020): APGD-CE then APGD-DLR,
  each step's gradient the mean over 20 draws, 100 steps. Done for a randomized model: *every*
  example is attacked (no filtering on one clean draw), and per example the point kept is the one
  with the lower accuracy over fresh draws (not the first point that fooled one draw).

On a deterministic model both run with one draw (plain APGD). Random starts use torch's global
generator, path draws the models' own generators: the evaluation seeds both per cell.
"""

from __future__ import annotations

import torch

from sors.attacks.apgd import BestPoints, apgd
from sors.attacks.base import Attack, register
from sors.attacks.objectives import EXACT_PATHS_MAX, LOSS_NAMES, draw_accuracy, eot_objective, resolve_draws
from sors.errors import ConfigError


def draws_for(attack: Attack, samples: int) -> int | None:
    """Draws for ``attack``'s expectations on its model: None (every path, exact) when the model is a
    super-network with at most the ``exact_paths_max`` option's paths, 1 for a deterministic model,
    else ``samples``."""
    return resolve_draws(attack.model, samples, attack.options.get("exact_paths_max", EXACT_PATHS_MAX))


def examples_per_forward(attack: Attack, max_batch: int | None, draws: int | None) -> int | None:
    """Examples per forward so that examples x draws stays within ``max_batch`` rows (None: no cap)."""
    rows = attack.model.num_paths if draws is None else draws
    return None if not max_batch else max(1, max_batch // rows)


@register("eot_apgd", label="EOT-APGD", order=62, iterative=True)
class EOTAPGD(Attack):
    """APGD on the expected softmax over ``eot_samples`` (32) path draws per example, one batched
    forward per step. Options: ``steps`` (100), ``restarts`` (2: the first from the clean image, then
    uniform in the ball; ``random_start``: every one from a uniform point), ``loss`` (``expected_ce`` or ``expected_margin``; also ``mean_ce``,
    ``mean_dlr``), ``stop_when_broken`` (True: an example wrong under every draw of a step stops),
    ``max_batch`` (rows = examples x draws per forward), ``sequential_draws`` (False: the draws run
    as one batched forward; True: as separate forwards, the straightforward reference)."""

    name = "eot_apgd"
    defaults = {
        "steps": 100,
        "eot_samples": 32,
        "restarts": 2,
        "loss": "expected_ce",
        "random_start": False,
        "stop_when_broken": True,
        "sequential_draws": False,
        "max_batch": 65536,
        "exact_paths_max": EXACT_PATHS_MAX,
    }

    def validate(self) -> None:
        super().validate()
        if self.options["loss"] not in LOSS_NAMES:
            raise ConfigError("attack.loss", f"unknown loss {self.options['loss']!r}", ", ".join(LOSS_NAMES))
        if not (isinstance(self.options["restarts"], int) and self.options["restarts"] >= 1):
            raise ConfigError("attack.restarts", f"{self.options['restarts']!r}", "an integer >= 1")

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss: str,
        best: BestPoints | None = None,
        start: torch.Tensor | None = None,
    ) -> BestPoints:
        """APGD with ``loss`` on (x, y) from ``start`` (None: see the options); updates and returns ``best``."""
        draws = draws_for(self, self.options["eot_samples"])
        objective = eot_objective(self.model, loss, draws, self.options["sequential_draws"])
        return apgd(
            objective,
            x,
            y,
            self.eps,
            self.options["steps"],
            self.options["restarts"],
            random_start=self.options["random_start"],
            stop_when_broken=self.options["stop_when_broken"],
            best=best,
            max_examples=examples_per_forward(self, self.options["max_batch"], draws),
            start=start,
        )

    def perturb(self, x, y):
        return self.run(x, y, self.options["loss"]).adv

    def perturb_from(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """:meth:`perturb` warm-started at ``start`` (B, C, H, W), a point of the eps-ball around ``x``."""
        return self.run(x, y, self.options["loss"], start=start).adv


@register("autoattack_rand", label="AA-rand", order=70, iterative=True)
class AutoAttackRand(Attack):
    """APGD-CE then APGD-DLR with EOT over ``eot_samples`` (20) draws (mean of per-draw gradients),
    ``steps`` (100) each, one restart, on every example. Each run's output is scored over
    ``select_draws`` (64) fresh draws; per example the lower-accuracy point is kept, and APGD-DLR
    runs only on the examples APGD-CE left correct under some fresh draw."""

    name = "autoattack_rand"
    defaults = {
        "steps": 100,
        "eot_samples": 20,
        "select_draws": 64,
        "max_batch": 65536,
        "exact_paths_max": 0,
        "stop_when_broken": True,
        "sequential_draws": False,
    }

    def perturb(self, x, y):
        draws = draws_for(self, self.options["eot_samples"])
        select = draws_for(self, self.options["select_draws"])
        per_forward = examples_per_forward(self, self.options["max_batch"], draws)
        kept = BestPoints(x.clone(), draw_accuracy(self.model, x, y, select), torch.zeros(len(y), device=x.device))
        for loss in ("mean_ce", "mean_dlr"):
            stop = self.options["stop_when_broken"]
            index = torch.nonzero(kept.correct > 0 if stop else kept.correct > -1).squeeze(1)
            if len(index) == 0:
                break
            objective = eot_objective(self.model, loss, draws, self.options["sequential_draws"])
            found = apgd(
                objective,
                x[index],
                y[index],
                self.eps,
                self.options["steps"],
                restarts=1,
                stop_when_broken=stop,
                max_examples=per_forward,
            )
            fresh = draw_accuracy(self.model, found.adv, y[index], select)
            kept.offer(index, found.adv, fresh, torch.ones_like(fresh))
        return kept.adv
