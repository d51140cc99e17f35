"""Attack options are owned by the attacks: each registry entry says which config options it takes
(``attacks.info(name)["options"]``), and ``--set attack.<option>`` reaches every selected attack that
takes it -- in a sweep and in ``sors evaluate`` alike, as the stored rows show -- and is refused in one
line, naming the attacks that do, where none of the selected ones does."""

from __future__ import annotations

import pytest
import torch

from pipeline import cli
from pipeline.plan import presets
from pipeline.plan.cell_specs import cell_specs
from pipeline.store import results
from sors import attacks, models
from sors import config as config_lib
from sors import train as train_lib
from sors.attacks.base import CONFIG_OPTIONS
from sors.errors import ConfigError
from tasks import cells as cells_lib

pytestmark = pytest.mark.timeout(300)
TINY_EVAL = ["eval.n_examples=4", "eval.repeats=1", "eval.all_paths=2", "eval.batch_size=4", "attack.steps=1"]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sors {command}: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("name", [n for n in attacks.available() if not attacks.info(n)["transfer"]])
def test_every_option_an_attack_declares_builds_and_any_other_is_refused(name):
    net = models.build("sors_lenet5")
    declared = attacks.info(name)["options"]
    for option, default in declared.items():
        value = {int: 2, bool: True, str: "x"}[CONFIG_OPTIONS[option].kind]
        attacks.build(name, net, 0.1, **{option: value})  # taken: no error
        assert default is None or isinstance(default, CONFIG_OPTIONS[option].kind)
    for option in sorted(set(CONFIG_OPTIONS) - set(declared)):
        with pytest.raises(ConfigError, match=f"attack.{option}"):
            attacks.build(name, net, 0.1, **{option: 2})


def test_a_transfer_attack_takes_its_base_attacks_options_and_a_source():
    assert set(attacks.info("transfer_pgd")["options"]) == set(attacks.info("pgd")["options"]) | {"source"}
    assert set(attacks.info("transfer_fgsm")["options"]) == set(attacks.info("fgsm")["options"]) | {"source"}


def test_eot_samples_reaches_every_selected_attack_that_takes_it_in_a_sweep(tmp_path):
    overrides = ["attack.name=ensemble_pgd,autoattack_rand,cw", "attack.eot_samples=7", *TINY_EVAL]
    sweep = presets.build_sweep("smoke", overrides)
    assert {a["name"]: a.get("eot_samples") for a in sweep.evaluation.attacks} == {
        "ensemble_pgd": 7,
        "autoattack_rand": 7,
        "cw": None,  # takes no eot_samples: left as it is
    }
    trial = next(t for t in sweep.trials if t.name == "sors")
    checkpoint = train_lib.save_checkpoint(tmp_path / "sors.pt", train_lib.fit(trial.config), trial.config)
    record = {"checkpoint_uri": str(checkpoint), "checkpoint_sha256": "0" * 64}
    specs = [s for s in cell_specs(trial, record, sweep.evaluation, sweep.name) if s.attack.name != "cw"]
    torch.manual_seed(0)
    rows = {s.attack.name: cells_lib.evaluate(s)[1] for s in specs if s.attack.name != "none"}
    assert {name: row["eot_samples"] for name, row in rows.items()} == {"ensemble_pgd": 7, "autoattack_rand": 7}


def test_an_option_no_selected_attack_takes_is_one_line_naming_those_that_do(tmp_path, capsys):
    code = cli.main(
        [
            "sweep",
            "smoke",
            "--results-dir",
            str(tmp_path / "r"),
            "--set",
            "attack.name=cw",
            "--set",
            "attack.eot_samples=7",
        ]
    )
    assert code == 2
    err = _one_line_error(capsys, "sweep")
    assert "attack.eot_samples" in err and "cw" in err and "ensemble_pgd" in err and "eot_pgd" in err
    assert not (tmp_path / "r").exists()  # nothing written
    with pytest.raises(ConfigError, match="does not take random_start"):
        presets.evaluation_plan(presets.EvalPlan(attacks=({"name": "fgsm", "random_start": True},)), [])


@pytest.mark.ray
def test_eot_samples_reaches_the_attacks_of_sors_evaluate_in_the_stored_rows(ray_session, tmp_path, capsys):
    cfg = config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(), {"model.name": "lenet5", "data.n_train": 64, "data.n_test": 8, "train.epochs": 1}
        )
    )
    target = train_lib.save_checkpoint(tmp_path / "target.pt", train_lib.fit(cfg), cfg)
    common = ["--results-dir", str(tmp_path / "results"), "--no-progress", "--set", "attack.eps=50/255"]
    for option in TINY_EVAL:
        common += ["--set", option]
    argv = ["evaluate", str(target), "--set", "attack.name=pgd,fgsm", "--set", "attack.eot_samples=3", *common]
    assert cli.main(argv) == 0
    rows = results.read_rows(tmp_path / "results" / "cells")
    assert {r["attack"]: r["eot_samples"] for r in rows if r["attack"] != "none"} == {"pgd": 3, "fgsm": 3}
    capsys.readouterr()
    refused = ["evaluate", str(target), "--set", "attack.name=cw", "--set", "attack.eot_samples=3", *common]
    assert cli.main(refused) == 2
    assert "none of the selected attacks (cw) takes it" in _one_line_error(capsys, "evaluate")
