"""ARC for super-networks: the attack of Dbouk & Shanbhag (ICML 2022, "Adversarial Vulnerability of
Randomized Ensembles"), adapted from a finite ensemble to a super-network by iterating over
sampled paths.

Why it exists: averaging gradients over draws (EOT) can cancel when the members disagree, and
randomized ensembles then look robust. ARC instead walks towards each member's own nearest decision
boundary in turn and keeps a step only when the *expected accuracy* of the whole randomized model
does not get worse, so it finds points that fool many members at once.

Each of ``steps`` outer iterations: ``members`` draws of the model (each example its own draw);
for each, the linearised distance to the closest boundary among the top ``topk`` classes (DeepFool,
L-inf: zeta = |z_m - z_j| / ||grad(z_m - z_j)||_1, direction -sign(grad)); a local step of L-inf
size ``step_size`` (default eps/4) around the current point, with ARC's beta rule so later members'
steps keep earlier members fooled; a candidate is kept per example when its expected accuracy over
``eot_samples`` fixed draws (common random numbers) is not higher. On a deterministic model the one
member is the model itself.
"""

from __future__ import annotations

import torch

from sors.attacks.base import Attack, register
from sors.attacks.eot import draws_for
from sors.attacks.objectives import EXACT_PATHS_MAX, draw_accuracy, fixed_draws, fresh_seed, resolve_draws
from sors.models.supernet import per_example_sampling


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def nearest_boundary(model, x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one forward (one draw) of ``model`` at ``x`` (B, C, H, W): the L-inf-linearised distance
    ``zeta`` (B,) to the closest boundary between the predicted class and the next ``topk - 1``
    classes, the sign direction towards it (B, C, H, W), and the L1-normalised gradient (B, C, H, W)
    that ARC's step rule needs."""
    inp = x.detach().requires_grad_(True)
    with per_example_sampling(model):  # each example meets its own member
        logits = model(inp)
    order = logits.detach().topk(topk, dim=1).indices
    top = logits.gather(1, order[:, :1]).squeeze(1)
    zeta = torch.full((x.shape[0],), float("inf"), device=x.device)
    sign_dir, unit_dir = torch.zeros_like(x), torch.zeros_like(x)
    for rank in range(1, topk):
        other = logits.gather(1, order[:, rank : rank + 1]).squeeze(1)
        gap = top - other
        (grad,) = torch.autograd.grad(gap.sum(), inp, retain_graph=rank < topk - 1)
        l1 = _flat(grad).abs().sum(1) + 1e-10
        distance = gap.detach().abs() / l1
        closer = distance < zeta
        zeta = torch.where(closer, distance, zeta)
        sign_dir[closer] = -grad[closer].sign()
        unit_dir[closer] = -(grad / l1.view(-1, *([1] * (x.dim() - 1))))[closer]
    return zeta, sign_dir, unit_dir


@register("arc", label="ARC", order=72, iterative=True)
class ARC(Attack):
    """ARC over sampled paths. Options: ``steps`` (outer iterations, 20), ``members`` (draws per
    iteration, 8), ``eot_samples`` (fixed draws that score a candidate, 32), ``step_size`` (local
    L-inf radius; None: eps/4), ``topk`` (classes searched for the nearest boundary, 3),
    ``random_start`` (False)."""

    name = "arc"
    defaults = {
        "steps": 20,
        "members": 8,
        "eot_samples": 32,
        "step_size": None,
        "topk": 3,
        "random_start": False,
        "exact_paths_max": EXACT_PATHS_MAX,
    }

    def perturb(self, x, y):
        members = resolve_draws(self.model, self.options["members"], 0)
        draws = draws_for(self, self.options["eot_samples"])
        radius = self.options["step_size"] or self.eps / 4
        low, high = (x - self.eps).clamp(0, 1), (x + self.eps).clamp(0, 1)
        score_seed = fresh_seed()

        def expected_accuracy(delta: torch.Tensor) -> torch.Tensor:
            with fixed_draws(self.model, score_seed):
                return draw_accuracy(self.model, torch.clamp(x + delta, low, high), y, draws)

        delta = torch.zeros_like(x)
        if self.options["random_start"]:
            delta = torch.clamp(x + torch.empty_like(x).uniform_(-self.eps, self.eps), low, high) - x
        best = expected_accuracy(delta)
        for _ in range(self.options["steps"]):
            local, local_best = torch.zeros_like(x), best.clone()
            for member in range(members):
                candidate = self._member_step(
                    torch.clamp(x + delta + local, low, high), local, radius, first=member == 0
                )
                accuracy = expected_accuracy(torch.clamp(delta + candidate, -self.eps, self.eps))
                keep = accuracy <= local_best
                local[keep] = candidate[keep]
                local_best = torch.minimum(local_best, accuracy)
            proposal = torch.clamp(delta + local, -self.eps, self.eps)
            accuracy = expected_accuracy(proposal)
            keep = accuracy <= best
            delta[keep] = proposal[keep]
            best = torch.minimum(best, accuracy)
            if not (best > 0).any():
                break
        return torch.clamp(x + delta, low, high)

    def _member_step(self, point: torch.Tensor, local: torch.Tensor, radius: float, first: bool) -> torch.Tensor:
        """ARC's local update for one draw of the model at ``point``: the new local perturbation (L-inf = radius)."""
        zeta, sign_dir, unit_dir = nearest_boundary(self.model, point, self.options["topk"])
        beta = torch.full_like(zeta, radius)
        if not first:  # keep what earlier members gained: just cross this member's boundary
            along = (_flat(unit_dir) * _flat(local)).sum(1)
            crossing = radius / (radius - zeta + 1e-10) * (zeta - along).abs() + 0.05 * self.eps
            beta = torch.where(zeta < radius, crossing, beta)
        step = local + beta.view(-1, *([1] * (local.dim() - 1))) * sign_dir
        norm = _flat(step).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (local.dim() - 1)))
        return radius * step / norm
