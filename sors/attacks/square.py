"""Square attack (Andriushchenko et al., ECCV 2020), L-inf, with EOT: a gradient-free check.

A defense that only breaks gradients (shattered or stochastic gradients, masking) does not stop a
random search that never looks at a gradient; when Square finds much lower accuracy than the
gradient attacks, the gradient attacks were being fooled.

The search keeps, per example, a perturbation on the corners of the eps-ball. Each query redraws
one random square window (side shrinking with the schedule of the paper, from ``p_init`` = 0.8 of
the pixels) at +eps or -eps per channel and keeps it when the expected margin over
``eot_samples`` draws grows. Draws are common random numbers, renewed every ``redraw`` queries
(the current point is re-scored then), so a comparison is between two points under the same
sub-networks. Examples wrong under every draw stop early.
"""

from __future__ import annotations

import math

import torch

from sors.attacks.base import Attack, register
from sors.attacks.eot import draws_for
from sors.attacks.objectives import (
    EXACT_PATHS_MAX,
    _expected_log_probs,
    _true_and_best_other,
    draw_logits,
    fixed_draws,
    fresh_seed,
)


def window_fraction(query: int, queries: int, p_init: float) -> float:
    """Fraction of pixels the square covers at ``query`` of ``queries`` (the paper's schedule for
    10,000 queries, rescaled): p_init halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000."""
    at = int(query / queries * 10000)
    halvings = sum(at > mark for mark in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


@torch.no_grad()
def _margin_and_correct(model, images, y, draws, seed):
    """(expected margin loss (B,), fraction of draws correct (B,)) under the draws of ``seed``."""
    with fixed_draws(model, seed):
        logits = draw_logits(model, images, draws)
    true, other = _true_and_best_other(_expected_log_probs(logits), y)
    return other - true, (logits.argmax(-1) == y).float().mean(0)


def _random_squares(shape, side: int, eps: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example one side x side window at a random place (mask (B, 1, H, W)) and +-eps per channel."""
    batch, channels, height, width = shape
    top = torch.randint(0, height - side + 1, (batch, 1), device=device)
    left = torch.randint(0, width - side + 1, (batch, 1), device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
    signs = torch.randint(0, 2, (batch, channels, 1, 1), device=device).float() * 2 - 1
    return mask, eps * signs


@register("square_eot", label="Square-EOT", order=74)
class SquareEOT(Attack):
    """Square (L-inf) on the expected margin over ``eot_samples`` (16) draws. Options: ``steps``
    (queries, 300), ``p_init`` (0.8), ``redraw`` (queries between draw renewals, 25)."""

    name = "square_eot"
    defaults = {"steps": 300, "eot_samples": 16, "p_init": 0.8, "redraw": 25, "exact_paths_max": EXACT_PATHS_MAX}

    def perturb(self, x, y):
        draws = draws_for(self, self.options["eot_samples"])
        low, high = (x - self.eps).clamp(0, 1), (x + self.eps).clamp(0, 1)
        batch, channels, height, width = x.shape
        stripes = torch.randint(0, 2, (batch, channels, 1, width), device=x.device).float() * 2 - 1
        delta = self.eps * stripes.expand_as(x).clone()
        adv = torch.clamp(x + delta, low, high)
        active = torch.arange(batch, device=x.device)
        loss = torch.full((batch,), float("-inf"), device=x.device)
        correct = torch.ones(batch, device=x.device)
        queries = self.options["steps"]
        for query in range(queries):
            if query % self.options["redraw"] == 0:
                # the active batch only changes here: within a window every example keeps its draws
                active = active[correct[active] > 0]
                if len(active) == 0:
                    break
                seed = fresh_seed()
                loss[active], correct[active] = _margin_and_correct(self.model, adv[active], y[active], draws, seed)
            fraction = window_fraction(query, queries, self.options["p_init"])
            side = max(1, min(height, round(math.sqrt(fraction * height * width))))
            mask, values = _random_squares((len(active), channels, height, width), side, self.eps, x.device)
            trial_delta = torch.where(mask, values, delta[active])
            trial = torch.clamp(x[active] + trial_delta, low[active], high[active])
            trial_loss, trial_correct = _margin_and_correct(self.model, trial, y[active], draws, seed)
            better = trial_loss > loss[active]
            chosen = active[better]
            delta[chosen], adv[chosen] = trial_delta[better], trial[better]
            loss[chosen], correct[chosen] = trial_loss[better], trial_correct[better]
        return adv
