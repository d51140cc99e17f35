"""Auto-PGD (Croce & Hein, ICML 2020) under an L-inf budget, on any :data:`Objective`, with the
bookkeeping a randomized model needs.

Per example: a step size that starts at 2 eps and halves at APGD's checkpoints when the loss
stalls (the search restarts from the best point then), momentum 0.75 on the iterate, random
restarts, and the *best point* kept by the objective's own accuracy estimate (fraction of draws
still correct; ties by loss), not by the last iterate. Early stop: an example whose best point is
wrong under every draw of a step leaves the active batch, so the cost goes to the examples that
still resist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sors.attacks.base import linf_box
from sors.attacks.objectives import Objective


@dataclass
class BestPoints:
    """Per example of a batch: the most damaging point found so far, its estimated accuracy
    (fraction of the objective's draws still correct, lower is better) and its loss (ties)."""

    adv: torch.Tensor  # (B, C, H, W) in [0, 1]
    correct: torch.Tensor  # (B,)
    loss: torch.Tensor  # (B,)

    @classmethod
    def start(cls, x: torch.Tensor) -> "BestPoints":
        """Nothing found yet: the clean images, accuracy 1 (unmeasured), loss -inf."""
        ones = torch.ones(x.shape[0], device=x.device)
        return cls(x.clone(), ones, torch.full_like(ones, float("-inf")))

    def offer(self, index: torch.Tensor, adv: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor) -> None:
        """Keep ``adv`` for the examples ``index`` where it is better than what is kept."""
        kept_correct, kept_loss = self.correct[index], self.loss[index]
        better = (correct < kept_correct) | ((correct == kept_correct) & (loss > kept_loss))
        chosen = index[better]
        self.adv[chosen] = adv[better].detach()
        self.correct[chosen] = correct[better]
        self.loss[chosen] = loss[better].detach()


def checkpoints(steps: int) -> set[int]:
    """APGD's step-size checkpoints: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06),
    as iteration numbers in 1..steps."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    return {math.ceil(p * steps) for p in fractions[1:] if 0 < math.ceil(p * steps) <= steps}


def _loss_and_grad(objective: Objective, adv: torch.Tensor, y: torch.Tensor, max_examples: int | None):
    """(loss (B,), correct (B,), d loss / d adv (B, C, H, W)), in chunks of ``max_examples``."""
    chunk = max_examples or adv.shape[0]
    losses, corrects, grads = [], [], []
    for start in range(0, adv.shape[0], chunk):
        inp = adv[start : start + chunk].detach().requires_grad_(True)
        loss, correct = objective(inp, y[start : start + chunk])
        grads.append(torch.autograd.grad(loss.sum(), inp)[0])
        losses.append(loss.detach())
        corrects.append(correct)
    return torch.cat(losses), torch.cat(corrects), torch.cat(grads)


class _Run:
    """The active examples of one APGD run: every per-example tensor, shrunk together."""

    def __init__(self, **tensors: torch.Tensor):
        self.__dict__.update(tensors)
        self.names = list(tensors)

    def keep(self, mask: torch.Tensor) -> None:
        for name in self.names:
            setattr(self, name, getattr(self, name)[mask])

    def __len__(self) -> int:
        return len(self.index)


def apgd(
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    restarts: int = 1,
    random_start: bool = False,
    momentum: float = 0.75,
    stop_when_broken: bool = True,
    best: BestPoints | None = None,
    max_examples: int | None = None,
    start: torch.Tensor | None = None,
) -> BestPoints:
    """Run APGD on ``objective`` from ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,).

    ``restarts`` runs; the first starts at ``start`` (a warm start inside the eps-ball, e.g. the best
    point of an earlier attack) or else at ``x`` unless ``random_start``; later ones at a uniform
    point of the eps-ball, each only on the examples not broken yet (with ``stop_when_broken``).
    ``best`` (optional) is updated in place and returned; ``max_examples`` caps the examples per
    forward (each forward holds examples x draws rows).
    """
    best = best or BestPoints.start(x)
    low, high = linf_box(x, eps)
    marks = checkpoints(steps)
    for restart in range(restarts):
        index = torch.arange(len(y), device=x.device)
        if stop_when_broken:
            index = index[best.correct > 0]
        if len(index) == 0:
            break
        first = x[index] if start is None or restart > 0 else torch.clamp(start[index], low[index], high[index])
        if restart > 0 or (random_start and start is None):
            first = torch.clamp(first + torch.empty_like(first).uniform_(-eps, eps), low[index], high[index])
        _run(
            objective,
            first,
            y[index],
            low[index],
            high[index],
            eps,
            steps,
            marks,
            momentum,
            best,
            index,
            stop_when_broken,
            max_examples,
        )
    return best


def _run(objective, start, y, low, high, eps, steps, marks, momentum, best, index, stop_when_broken, max_examples):
    loss, correct, grad = _loss_and_grad(objective, start, y, max_examples)
    best.offer(index, start, correct, loss)
    count = len(y)
    run = _Run(
        index=index,
        y=y,
        low=low,
        high=high,
        adv=start,
        prev=start,
        grad=grad,
        loss=loss,
        step=torch.full((count,), 2.0 * eps, device=start.device),
        run_best_adv=start.clone(),
        run_best_loss=loss.clone(),
        run_best_grad=grad.clone(),
        increases=torch.zeros(count, device=start.device),
        checkpoint_loss=loss.clone(),
        halved=torch.zeros(count, dtype=torch.bool, device=start.device),
    )
    last_mark = 0
    for t in range(1, steps + 1):
        _step(run, momentum, first=t == 1)
        loss, correct, run.grad = _loss_and_grad(objective, run.adv, run.y, max_examples)
        run.increases += (loss > run.loss).float()
        run.loss = loss
        best.offer(run.index, run.adv, correct, loss)
        improved = loss > run.run_best_loss
        run.run_best_loss = torch.where(improved, loss, run.run_best_loss)
        run.run_best_adv[improved] = run.adv[improved]
        run.run_best_grad[improved] = run.grad[improved]
        if t in marks:
            _checkpoint(run, t - last_mark)
            last_mark = t
        if stop_when_broken:
            run.keep(best.correct[run.index] > 0)
            if len(run) == 0:
                return


def _step(run: _Run, momentum: float, first: bool) -> None:
    """One APGD iterate: a sign step, then (after the first) momentum on the iterate, both projected."""
    size = run.step.view(-1, *([1] * (run.adv.dim() - 1)))
    z = torch.clamp(run.adv + size * run.grad.sign(), run.low, run.high)
    if not first:
        z = torch.clamp(run.adv + momentum * (z - run.adv) + (1 - momentum) * (run.adv - run.prev), run.low, run.high)
    run.prev, run.adv = run.adv, z


def _checkpoint(run: _Run, since: int, rho: float = 0.75) -> None:
    """APGD's rule: halve the step (and go back to the best point) where the loss rose in fewer than
    ``rho`` of the steps since the last checkpoint, or where neither the step nor the best loss
    changed at the last one."""
    stalled = run.increases < rho * since
    unchanged = ~run.halved & (run.checkpoint_loss >= run.run_best_loss)
    halve = stalled | unchanged
    run.step = torch.where(halve, run.step / 2, run.step)
    run.adv[halve] = run.run_best_adv[halve]
    run.prev[halve] = run.run_best_adv[halve]
    run.grad[halve] = run.run_best_grad[halve]
    run.increases.zero_()
    run.halved = halve
    run.checkpoint_loss = run.run_best_loss.clone()
