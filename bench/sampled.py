"""``sors bench --cases sampled`` (opt-in): the adaptive suite in sampled mode against the exact mode.

Where a super-network's paths cannot be enumerated (SORS-ResNet-18, SORS* path pairs) every member
samples its draws. On a trained SORS-LeNet-5 (``SORS_BENCH_CHECKPOINT``, see :mod:`bench.adaptive`)
and ``--eot-batch`` (500) Fashion-MNIST test images at eps 25/255, the suite runs twice:
enumeration on (the default) and off (``exact_paths_max: 0`` for the suite and every member); both
results are scored exactly over all 1,024 paths, so the gap is the sampled mode's weakness alone.
"""

from __future__ import annotations

from bench.adaptive import trained_sors
from bench.harness import CLOCK, CLOCKS, Row, Settings
from sors import attacks, data
from sors.attacks.objectives import draw_accuracy
from sors.attacks.suite import DEFAULT_MEMBERS


def sampled_members(members=DEFAULT_MEMBERS) -> tuple[tuple[str, dict], ...]:
    """``members`` with enumeration switched off in each (every expectation sampled)."""
    return tuple((name, {**options, "exact_paths_max": 0}) for name, options in members)


def case_sampled(s: Settings) -> list[Row]:
    """Exact expected accuracy and time of the suite exact vs sampled -> ``sampled.gap_points``, ``sampled.time_ratio``."""
    model = trained_sors(s.device)
    n = 8 if s.quick else (s.eot_batch or 500)
    x, y = data.load("fashion_mnist", "test", n=n)
    x, y = x.to(s.device), y.to(s.device)
    eps = 25 / 255
    members = (("eot_apgd", {"steps": 2}),) if s.quick else DEFAULT_MEMBERS
    clock = CLOCKS[CLOCK["name"]]
    result = {}
    for mode, options in (
        ("exact", {"members": members}),
        ("sampled", {"members": sampled_members(members), "exact_paths_max": 0}),
    ):
        suite = attacks.build("adaptive", model, eps, **({"steps": 2} if s.quick else {}), **options)
        started = clock()
        points = suite(x, y)
        seconds = clock() - started
        result[mode] = (100 * draw_accuracy(model, points, y, None).mean().item(), seconds)
    detail = {
        "model": "sors_lenet5 (trained)",
        "images": f"test 0..{n - 1}",
        "eps": "25/255",
        "scored": "exact over every path",
    }
    rows = [
        Row(f"sampled.{mode}", round(acc, 2), "% accuracy", {**detail, "s": round(sec, 1)})
        for mode, (acc, sec) in result.items()
    ]
    rows.append(
        Row(
            "sampled.gap_points",
            round(result["sampled"][0] - result["exact"][0], 2),
            "points",
            {"meaning": "how much weaker the sampled mode is"},
        )
    )
    rows.append(
        Row("sampled.time_ratio", round(result["sampled"][1] / max(result["exact"][1], 1e-9), 3), "x exact", {})
    )
    return rows
