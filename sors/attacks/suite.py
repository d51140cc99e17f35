"""The adaptive suite, ``attack.name=adaptive``: per example, the worst case over member attacks.

An example counts as robust only if it survives every member, as AutoAttack and RobustBench
report. The members run in order, each on the examples that every earlier member left correct
under some fresh draw; each member's output is scored over ``select_draws`` fresh path draws
(independent of the members' own draws and of the evaluation's scoring draws), and per example
the point with the lowest fresh-draw accuracy is kept. The suite returns that point; the
evaluation protocol then scores it over its own fresh draws, as for any attack.

Default members (each also usable alone from the registry):

1. ``eot_apgd`` with ``expected_ce``: APGD on -log E[p_y] over per-example path draws (exact over
   every path where the model allows it);
2. ``eot_apgd`` with ``path_margin`` (mean over paths of the per-path margin, capped: flips as many
   paths as it can), from a random start;
3. ``autoattack_rand``: APGD-CE + APGD-DLR with mean-gradient EOT, every example attacked;
5. ``arc``: the attack for randomized ensembles, over sampled paths;
6. ``square_eot``: gradient-free random search on the expected margin (a masking check).

On a deterministic model every member runs with one draw. ``steps`` and ``eot_samples`` set by the
config apply to the EOT-APGD members; the others keep their own defaults.
"""

from __future__ import annotations

import time

import torch

from sors.attacks.apgd import BestPoints
from sors.attacks.base import ATTACKS, Attack, register
from sors.attacks.eot import draws_for
from sors.attacks.objectives import EXACT_PATHS_MAX, draw_accuracy
from sors.errors import ConfigError

DEFAULT_MEMBERS: tuple[tuple[str, dict], ...] = (
    ("eot_apgd", {"loss": "expected_ce"}),
    ("eot_apgd", {"loss": "path_margin", "random_start": True}),
    ("eot_apgd", {"loss": "path_sigmoid", "steps": 400, "warm_start": True}),
    ("autoattack_rand", {}),
    ("arc", {"steps": 10, "members": 4}),
    ("square_eot", {"steps": 200, "exact_paths_max": 0}),
)


_STRAIGHTFORWARD = {"sequential_draws": True, "stop_when_broken": False}
REFERENCE_OPTIONS = {"eot_apgd": _STRAIGHTFORWARD, "autoattack_rand": _STRAIGHTFORWARD}


def member_label(attack: Attack) -> str:
    """A member's name in ``last_stats`` and cell extras: ``eot_apgd:expected_ce``, ``arc``..."""
    return f"{attack.name}:{attack.options['loss']}" if "loss" in attack.options else attack.name


@register("adaptive", label="Adaptive", order=5, iterative=True, suite=True)
class AdaptiveSuite(Attack):
    """Worst case over ``members`` (default :data:`DEFAULT_MEMBERS`). Options: ``steps`` /
        ``eot_samples`` (for the EOT-APGD members: 200 / 32), ``restarts`` (EOT-APGD, 1 each: the second member is the restart, from a random start with another loss),
        ``select_draws`` (fresh draws that score each member's output, 64), ``members`` (a list of
        ``(name, options)``; a member's option ``warm_start: True`` starts an ``eot_apgd`` member at the best
    point found so far instead of the clean image), ``reference`` (True: the straightforward implementation the benchmark
        compares against: the same attacks with every member on every example, each draw -- or each
        path, for an exact expectation -- as a sequential forward, no early stop). After a call, ``last_stats`` holds per member the examples it attacked and
        the fresh-draw accuracy of its points, and ``member_correct[label]`` per example (NaN where the
        member did not run because the example was already broken)."""

    name = "adaptive"
    defaults = {
        "steps": 200,
        "eot_samples": 32,
        "restarts": 1,
        "select_draws": 64,
        "members": DEFAULT_MEMBERS,
        "exact_paths_max": EXACT_PATHS_MAX,
        "reference": False,
    }

    def validate(self) -> None:
        super().validate()
        for entry in self.options["members"]:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], dict)):
                raise ConfigError(
                    "attack.members", f"{entry!r} is not (name, options)", "e.g. ('eot_apgd', {'loss': 'expected_ce'})"
                )
            ATTACKS.check_name(entry[0])
            if entry[0] == self.name:
                raise ConfigError("attack.members", "the suite cannot contain itself", "member attacks")
        self.member_correct: dict[str, torch.Tensor] = {}

    def members(self) -> list[tuple[str, Attack]]:
        """The member attacks, built on this suite's model and eps."""
        built = []
        for name, entry_options in self.options["members"]:
            options = {k: v for k, v in entry_options.items() if k != "warm_start"}
            if name == "eot_apgd":
                options = {
                    "steps": self.options["steps"],
                    "eot_samples": self.options["eot_samples"],
                    "restarts": self.options["restarts"],
                    **options,
                }
            if self.options["reference"] and name in REFERENCE_OPTIONS:
                options.update(REFERENCE_OPTIONS[name])
            member = ATTACKS[name](self.model, self.eps, **options)
            member.warm_start = bool(dict(entry_options).get("warm_start")) and hasattr(member, "perturb_from")
            label = member_label(member)
            taken = [existing for existing, _ in built if existing.split("#")[0] == label]
            built.append((f"{label}#{len(taken) + 1}" if taken else label, member))
        return built

    def perturb(self, x, y):
        select = draws_for(self, self.options["select_draws"])
        kept = BestPoints(x.clone(), draw_accuracy(self.model, x, y, select), torch.zeros(len(y), device=x.device))
        self.member_correct, self.last_stats = {}, {"clean": float(kept.correct.mean()) if len(y) else 0.0}
        for label, member in self.members():
            index = torch.nonzero(kept.correct > (-1 if self.options["reference"] else 0)).squeeze(1)
            outcome = torch.full((len(y),), float("nan"), device=x.device)
            started = time.perf_counter()
            if len(index):
                if member.warm_start:
                    found = member.perturb_from(x[index], y[index], kept.adv[index])
                else:
                    found = member.perturb(x[index], y[index])
                found = member.project(found.detach(), x[index])
                fresh = draw_accuracy(self.model, found, y[index], select)
                outcome[index] = fresh
                kept.offer(index, found, fresh, torch.ones_like(fresh))
            self.member_correct[label] = outcome.cpu()
            self.last_stats[f"{label}.attacked"] = int(len(index))
            self.last_stats[f"{label}.seconds"] = round(time.perf_counter() - started, 2)
            self.last_stats[f"{label}.accuracy_after"] = float(kept.correct.mean()) if len(y) else 0.0
        return kept.adv
