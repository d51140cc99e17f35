"""``sors bench --cases strength`` (opt-in): does an attack stronger than the adaptive suite find more?

On a trained SORS-LeNet-5 (``SORS_BENCH_CHECKPOINT``, e.g. the main job's, or a short training run)
and ``--eot-batch`` (200) Fashion-MNIST test images *after* the main job's first 500, at eps =
25/255: the suite's points, then stronger attacks -- each warm-started at the suite's point, as a
user with more compute would continue -- and the per-example worst case over all of them. Every
accuracy is the exact expected accuracy over all 1,024 paths (no scoring noise), so a difference of
one example's fraction of paths is a real difference.

The stronger attacks: the suite's sharpest member (``path_sigmoid``) with 3x the steps; and
targeted versions of it (APGD-T's idea on a randomized model: every path pushed towards the *same*
wrong class, the first, second and third most probable one in expectation at the suite's point).
Last, the top-1 targeted attack alone from a random start, as an independent check would run it.
A suite that is strong enough leaves ``strength.gain_points`` (suite minus worst case) near 0.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.adaptive import EPS, trained_sors
from bench.harness import Row, Settings
from sors import attacks, data
from sors.attacks.apgd import BestPoints, apgd
from sors.attacks.objectives import PATH_SIGMOID_T, draw_accuracy, draw_logits
from sors.attacks.suite import DEFAULT_MEMBERS

HELD_OUT_FROM = 500  # the main job attacks test images 0..499
TARGET_RANKS = (0, 1, 2)
# the suite's own path_sigmoid member: the stronger attacks run it 3x as long, the targeted ones as long
MEMBER_STEPS = next(options["steps"] for _, options in DEFAULT_MEMBERS if options.get("loss") == "path_sigmoid")


def targeted_objective(model: torch.nn.Module, classes: int):
    """The mean over every path of sigmoid((log p_t - log p_y) / T) for a target class t per example.

    APGD hands an objective only the labels of the examples still running, so the target rides in the
    label: ``y + classes * t``. Returns the :data:`~sors.attacks.objectives.Objective` and the encoder."""

    def objective(x: torch.Tensor, coded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, target = coded % classes, coded // classes
        logits = draw_logits(model, x, None)  # (paths, B, K)
        log_p = F.log_softmax(logits, dim=-1)
        pick = lambda labels: log_p.gather(-1, labels.view(1, -1, 1).expand(log_p.shape[0], -1, 1)).squeeze(-1)  # noqa: E731
        loss = torch.sigmoid((pick(target) - pick(y)) / PATH_SIGMOID_T).mean(0)
        return loss, (logits.detach().argmax(-1) == y).float().mean(0)

    return objective, lambda y, target: y + classes * target


@torch.no_grad()
def ranked_wrong_classes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K-1): the wrong classes of each example by expected probability over every path, highest first."""
    expected = F.softmax(draw_logits(model, x, None), dim=-1).mean(0)
    return expected.scatter(1, y[:, None], -1.0).argsort(1, descending=True)[:, :-1]


def case_strength(s: Settings) -> list[Row]:
    """The suite's exact expected accuracy, each stronger attack's from the suite's points, the worst case."""
    model = trained_sors(s.device)
    n = 16 if s.quick else (s.eot_batch or 200)
    x, y = data.load("fashion_mnist", "test", n=HELD_OUT_FROM + n)
    x, y = x[HELD_OUT_FROM:].to(s.device), y[HELD_OUT_FROM:].to(s.device)
    steps = 1 if s.quick else MEMBER_STEPS
    detail = {
        "model": "sors_lenet5 (trained)",
        "images": f"test {HELD_OUT_FROM}..{HELD_OUT_FROM + n - 1}",
        "eps": "25/255",
        "accuracy": "exact over every path",
    }
    rows, started = [], time.perf_counter()
    options = {"steps": 2, "members": (("eot_apgd", {"steps": 2}),)} if s.quick else {}
    suite_points = attacks.build("adaptive", model, EPS, **options)(x, y)
    suite_acc = draw_accuracy(model, suite_points, y, None)
    worst = suite_acc.clone()
    rows.append(Row("strength.suite", _percent(suite_acc), "% accuracy", {**detail, "s": _since(started)}))

    started = time.perf_counter()
    longer = attacks.build("eot_apgd", model, EPS, loss="path_sigmoid", steps=3 * steps, restarts=1)
    worst = _offer(
        rows,
        "strength.path_sigmoid_x3",
        draw_accuracy(model, longer.perturb_from(x, y, suite_points), y, None),
        worst,
        {"steps": 3 * steps, "s": _since(started)},
    )
    wrong = ranked_wrong_classes(model, suite_points, y)
    objective, encode = targeted_objective(model, classes=wrong.shape[1] + 1)
    for rank in TARGET_RANKS:
        started = time.perf_counter()
        best = apgd(
            objective, x, encode(y, wrong[:, rank]), EPS, steps=steps, best=BestPoints.start(x), start=suite_points
        )
        worst = _offer(
            rows,
            f"strength.targeted_top{rank + 1}",
            draw_accuracy(model, best.adv, y, None),
            worst,
            {"steps": steps, "s": _since(started)},
        )
    started = time.perf_counter()  # and as an independent check would run it: from a random start, no suite
    cold = apgd(objective, x, encode(y, wrong[:, 0]), EPS, steps=steps, random_start=True, best=BestPoints.start(x))
    worst = _offer(
        rows,
        "strength.targeted_top1_cold",
        draw_accuracy(model, cold.adv, y, None),
        worst,
        {"steps": steps, "start": "random", "s": _since(started)},
    )
    rows.append(Row("strength.worst_case", _percent(worst), "% accuracy", {"over": "the suite and every attack above"}))
    rows.append(
        Row(
            "strength.gain_points",
            round(_percent(suite_acc) - _percent(worst), 2),
            "points",
            {"meaning": "what the stronger attacks found beyond the suite"},
        )
    )
    return rows


def _offer(rows: list[Row], name: str, accuracy: torch.Tensor, worst: torch.Tensor, detail: dict) -> torch.Tensor:
    worst = torch.minimum(worst, accuracy)
    rows.append(Row(name, _percent(accuracy), "% accuracy", {**detail, "worst_so_far": _percent(worst)}))
    return worst


def _percent(accuracy: torch.Tensor) -> float:
    return round(100 * accuracy.mean().item(), 2)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 1)
