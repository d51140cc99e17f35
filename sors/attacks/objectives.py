"""What an adaptive attack maximises on a randomized model, estimated from E path draws in one
batched forward (one path per example per draw).

An :data:`Objective` maps a batch ``x`` (B, C, H, W) in [0, 1] that requires grad and its labels
``y`` (B,) to ``(loss (B,), correct (B,))``: the loss to *increase* (differentiable in ``x``) and,
per example, the fraction of the E draws that classify ``x`` correctly (the attack's own estimate
of the example's accuracy, used for best-point bookkeeping and early stop).

Losses (``loss=``):

- ``expected_ce``: -log E_paths[p_y(x)], the cross-entropy of the *expected* softmax. Its gradient
  weights each draw by how much probability it still gives the true class, so paths that are
  already fooled stop pulling (the mean of per-draw CE gradients does not: a few confident paths
  dominate it).
- ``expected_margin``: max_{j != y} log E[p_j] - log E[p_y], positive once the expected
  prediction is wrong (a margin on the deployed model's average vote).
- ``path_margin``: the mean over draws of each draw's margin max_{j != y} log p_j - log p_y, capped
  at :data:`PATH_MARGIN_CAP` (a draw already fooled by that much stops pulling).
- ``path_sigmoid``: the mean over draws of sigmoid(margin / :data:`PATH_SIGMOID_T`), a smooth count
  of the draws fooled: what the evaluation scores (the fraction of paths wrong), made
  differentiable. Sharp (T = 0.1), so it is meant to start from an earlier attack's point, where
  most draws sit near their decision boundary.
- ``mean_ce`` / ``mean_dlr``: the mean over draws of each draw's CE / DLR loss (AutoAttack's EOT:
  the gradient is the mean of per-draw gradients).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sors.models.factory import is_randomized
from sors.models.supernet import (
    enumerable,
    every_path,
    every_path_logits,
    per_example_sampling,
    repeat_forward,
    seeded_draws,
)

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _true_and_best_other(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., B, K) -> (score of the true class, best other score), each (..., B)."""
    labels = y.expand(scores.shape[:-1]).unsqueeze(-1)
    true = scores.gather(-1, labels).squeeze(-1)
    # the true class's score set to -inf in place of a one-hot mask: one pass over the scores, not four
    other = scores.scatter(-1, labels, float("-inf")).amax(-1)
    return true, other


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits ratio (Croce & Hein 2020), per example: -(z_y - max_{j!=y} z_j) /
    (z_(1) - z_(3) + 1e-12), for logits (..., B, K) with K >= 3. Scale-invariant in the logits."""
    top = logits.topk(3, dim=-1).values
    true, other = _true_and_best_other(logits, y)
    return -(true - other) / (top[..., 0] - top[..., 2] + 1e-12)


def _expected_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits (E, B, K) -> log of the mean softmax over the E draws, (B, K)."""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def _expected_true_log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logits (E, B, K) -> log E_draws[p_y], (B,): the true class's column of :func:`_expected_log_probs`,
    without the softmax of every class (one logsumexp over K per draw, one over E for the true class
    only: about a third of the cost on SORS-LeNet-5's 1,024 paths)."""
    true = logits.gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    return torch.logsumexp(true - torch.logsumexp(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def _loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # log p_j - log p_y = z_j - z_y: the per-path margins need no softmax (a third of a step's cost
    # on 1,024 paths: the log-softmax of every path and its backward)
    if name == "expected_ce":
        return -_expected_true_log_prob(logits, y)
    if name == "expected_margin":
        true, other = _true_and_best_other(_expected_log_probs(logits), y)
        return other - true
    if name == "mean_ce":
        flat = logits.flatten(0, 1)
        return F.cross_entropy(flat, y.repeat(logits.shape[0]), reduction="none").view(logits.shape[:2]).mean(0)
    if name == "mean_dlr":
        return dlr_loss(logits, y).mean(0)
    if name == "path_margin":
        true, other = _true_and_best_other(logits, y)
        return torch.clamp(other - true, max=PATH_MARGIN_CAP).mean(0)
    if name == "path_sigmoid":
        true, other = _true_and_best_other(logits, y)
        return torch.sigmoid((other - true) / PATH_SIGMOID_T).mean(0)
    raise ValueError(f"unknown objective loss {name!r}")


LOSS_NAMES = ("expected_ce", "expected_margin", "mean_ce", "mean_dlr", "path_margin", "path_sigmoid")
PATH_MARGIN_CAP = 1.0
# Measured on the main job's SORS-LeNet-5 at 25/255 (100 held-out images, warm start at the suite's
# points, exact over the 1,024 paths): T = 1 / 0.3 / 0.1 / 0.03 took the expected accuracy from
# 22.5% to 22.3 / 21.6 / 21.1 / 21.4% in 150 steps; 0.1 with 400 steps to 20.9%.
PATH_SIGMOID_T = 0.1


EXACT_PATHS_MAX = 4096  # as eval.exact_paths_max: enumerate a super-network with at most this many paths


def resolve_draws(model: nn.Module, samples: int, exact_paths_max: int = EXACT_PATHS_MAX) -> int | None:
    """How an attack takes expectations over ``model``'s randomness: ``None`` = exactly, over every
    path (a super-network with at most ``exact_paths_max`` paths: no sampling noise at all, for
    about the cost of 30-60 draws), 1 for a deterministic model, else ``samples`` random draws."""
    if exact_paths_max > 0 and enumerable(model, exact_paths_max):
        return None
    return samples if is_randomized(model) else 1


def draw_logits(model: nn.Module, x: torch.Tensor, draws: int | None, sequential: bool = False) -> torch.Tensor:
    """Logits of ``draws`` independent path draws per example, (draws, B, K), in one batched forward
    (:func:`repeat_forward` under :func:`per_example_sampling`). ``draws == 1``: one plain forward;
    ``draws is None``: every path of a super-network (:func:`every_path_logits`), (P, B, K).
    ``sequential``: the straightforward form instead, ``draws`` separate forwards each drawing one
    path for the whole batch, or one forward per path (the reference the benchmark compares against)."""
    if draws is None:
        if sequential:
            return torch.stack([model(x, path) for path in every_path(model)])
        return every_path_logits(model, x)
    if sequential:
        return torch.stack([model(x) for _ in range(draws)])
    if draws == 1:
        return model(x).unsqueeze(0)
    with per_example_sampling(model):
        return repeat_forward(model, x, draws).view(draws, x.shape[0], -1)


def eot_objective(
    model: nn.Module, loss: str = "expected_ce", draws: int | None = 32, sequential: bool = False
) -> Objective:
    """The :data:`Objective` of ``loss`` (see the module docstring) over ``draws`` draws per example
    (None: over every path, exactly; ``sequential``: see :func:`draw_logits`)."""
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown objective loss {loss!r}; allowed: {', '.join(LOSS_NAMES)}")

    def objective(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = draw_logits(model, x, draws, sequential)
        correct = (logits.detach().argmax(-1) == y).float().mean(0)
        return _loss(loss, logits, y), correct

    return objective


@torch.no_grad()
def draw_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int | None, max_rows: int = 16384
) -> torch.Tensor:
    """Per example, the fraction of ``draws`` fresh path draws that classify ``x`` correctly: (B,).
    Runs in chunks of at most ``max_rows`` image-draws per forward. ``draws is None``: the exact
    fraction of every path (the example's expected accuracy under a uniformly random path)."""
    if draws is None:
        per_chunk = max(1, max_rows // model.num_paths)
        return torch.cat(
            [
                (every_path_logits(model, x[s : s + per_chunk]).argmax(-1) == y[s : s + per_chunk]).float().mean(0)
                for s in range(0, x.shape[0], per_chunk)
            ]
        )
    per_chunk = max(1, min(draws, max_rows // max(1, x.shape[0])))
    correct = torch.zeros(x.shape[0], device=x.device)
    done = 0
    while done < draws:
        k = min(per_chunk, draws - done)
        correct += (draw_logits(model, x, k).argmax(-1) == y).float().sum(0)
        done += k
    return correct / draws


def fixed_draws(model: nn.Module, seed: int):
    """Context manager: the path draws (and any other torch-RNG noise) made inside are a fixed
    function of ``seed`` (:func:`seeded_draws`). Two blocks with the same seed and batch shape see the
    same draws (common random numbers: a candidate is compared with the current point under the
    same sub-networks, so the comparison is not noise). Everything is restored on exit."""
    return seeded_draws([model], seed, lambda i: seed * 1009 + i)


def fresh_seed() -> int:
    """A seed drawn from torch's global generator (so the caller's seeding decides it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
