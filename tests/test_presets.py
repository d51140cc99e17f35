"""Presets (pipeline.plan.presets): the shipped YAML files resolve into trials and an evaluation plan; the
plan's cells follow the model and attack registries' facts; ``sors evaluate``'s default plan takes
``attack.*`` overrides the way a preset does."""

from __future__ import annotations

import pytest

from pipeline.plan import presets
from sors import attacks

pytestmark = pytest.mark.timeout(400)


def test_every_shipped_preset_parses_into_resolved_trials():
    names = presets.available()
    assert {"smoke", "quick", "table2", "table3", "table4", "lambda", "operators"} <= set(names)
    for name in names:
        sweep = presets.build_sweep(name)
        assert sweep.trials and sweep.evaluation.attack_configs(), name
        for trial in sweep.trials:
            assert trial.config.train.epochs is not None  # resolved


def test_quick_preset_is_the_readme_job():
    sweep = presets.build_sweep("quick")
    models = {t.label: t.config for t in sweep.trials}
    assert list(models) == ["LeNet-5", "LeNet-5x4", "RS", "SORS"]
    assert models["LeNet-5x4"].model.members == "lenet5*4"
    assert models["RS"].model.name == "sors_lenet5" and models["RS"].train.lambda_ == 0
    assert models["SORS"].train.lambda_ == 10
    assert all(c.data.name == "fashion_mnist" and c.data.n_train is None for c in models.values())
    cells = sweep.evaluation.attack_configs()
    assert cells[0].name == "none"
    assert {c.name for c in cells[1:]} == {"adaptive", "fgsm", "pgd", "mim", "eot_pgd"}
    assert sorted({round(c.eps * 255) for c in cells[1:]}) == [25, 50, 75, 100]


def test_teachers_train_in_an_earlier_stage_than_their_students():
    sweep = presets.build_sweep("table2")
    groups = [[t.name for t in g] for g in presets.stages(sweep.trials)]
    assert "lenet5" in groups[0] and {"rs", "sors"} <= set(groups[1])
    assert [v.label for v in sweep.trial("sors").variants] == ["SORS*"]


def test_a_train_only_trial_nothing_uses_is_not_trained():
    assert "teacher" in {t.name for t in presets.build_sweep("table2").trials}
    without = presets.build_sweep("table2", ["train.teacher=none"])  # no student distils from it now
    assert "teacher" not in {t.name for t in without.trials} and {"lenet5", "rs", "sors"} <= {
        t.name for t in without.trials
    }
    table1 = presets.build_sweep("table1", ["train.teacher=none"])  # a transfer source stays (it is evaluated too)
    assert "resnet18_source" in {t.name for t in table1.trials}


def test_lambda_grid_expands_to_one_trial_per_value():
    sweep = presets.build_sweep("lambda", ["train.epochs=1"])
    assert sorted(t.config.train.lambda_ for t in sweep.trials) == [0, 1, 5, 10, 20, 50]
    assert all(t.config.train.epochs == 1 for t in sweep.trials)  # --set applies to every trial


def test_randomized_only_attacks_are_planned_for_randomized_models_only():
    sweep = presets.build_sweep("quick")
    deterministic = {a.name for a, _ in sweep.evaluation.cells(presets.is_randomized_arch("lenet5"))}
    randomized = {a.name for a, _ in sweep.evaluation.cells(presets.is_randomized_arch("sors_lenet5"))}
    assert "eot_pgd" in randomized and "eot_pgd" not in deterministic
    assert randomized - deterministic == {n for n in randomized if attacks.info(n)["randomized_only"]}


@pytest.mark.parametrize(
    "name, randomized",
    [
        ("sors_lenet5", True),
        ("sors_resnet18", True),
        ("rse_lenet5", True),
        ("lenet5", False),
        ("ensemble", False),
        ("vgg16", False),
    ],
)
def test_which_models_count_as_randomized(name, randomized):
    assert presets.is_randomized_arch(name) is randomized


def test_the_evaluate_default_plan_takes_attack_overrides_like_a_preset():
    plan = presets.default_plan("fashion_mnist")
    assert [a["name"] for a in plan.attacks] == ["adaptive", "fgsm", "pgd", "mim"] and len(plan.eps) == 4
    narrowed = presets.evaluation_plan(plan, ["attack.name=pgd", "attack.eps=8/255", "train.lambda=3"])
    cells = narrowed.attack_configs()
    assert [c.name for c in cells] == ["none", "pgd"]
    assert cells[1].eps == pytest.approx(8 / 255)
