"""The evaluation protocol, the sanity checks (each fires on a gradient-masked model and stays
quiet on plain ones), the table, the command line, and the gradient-orthogonality histograms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sors import attacks, checks, defenses, orthogonality
from sors import train as train_lib
from sors.config import AttackConfig, EvalConfig
from sors.evaluation import evaluate_cell, evaluate_model, format_table
from sors.models import ChoiceLayer, Ensemble, SuperNet, build, freeze_path
from tests.conftest import make_config

EPS = 50 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sors_model(trained_sors):
    return trained_sors[0]


# ------------------------------------------------------------------------------------------------
# The protocol


def test_a_cell_is_one_complete_record(lenet, fmnist_test):
    x, y = fmnist_test
    result = evaluate_cell(lenet, x, y, AttackConfig("pgd", EPS), EvalConfig(n_examples=200))
    adv = attacks.build("pgd", lenet, EPS)(x[:200], y[:200])
    with torch.no_grad():
        direct = (lenet(adv).argmax(-1) == y[:200]).float().mean().item()
    assert result.n == 200 and result.repeats == 1 and result.all_path_accuracy is None
    assert result.accuracy == pytest.approx(direct) == pytest.approx(result.correct / 200)
    assert result.ci_low < result.accuracy < result.ci_high
    assert (result.attack, result.norm, result.eps, result.steps, result.eot_samples) == ("pgd", "linf", EPS, 7, 1)
    assert result.attack_spec["step_size"] == pytest.approx(EPS / 4) and result.seconds > 0
    assert result.sanity_flags == [] and result.extra["zero_grad_fraction"] == 0
    record = json.loads(json.dumps(result.to_dict()))
    assert record["attack_spec"]["name"] == "pgd" and record["accuracy"] == result.accuracy


def test_randomized_models_are_scored_over_repeats_and_in_the_worst_case(sors_model, fmnist_test):
    x, y = fmnist_test
    cfg = EvalConfig(n_examples=300, repeats=5, all_paths=16)
    result = evaluate_cell(sors_model, x, y, AttackConfig("none", 0.0), cfg, seed=3)
    assert result.repeats == 5
    assert result.correct * 5 == pytest.approx(round(result.correct * 5))  # sums of k/5 per example
    assert any(0 < v < 1 for v in result.example_correct)  # some examples flip between draws
    assert result.all_path_accuracy < result.accuracy
    again = evaluate_cell(sors_model, x, y, AttackConfig("none", 0.0), cfg, seed=3)
    other = evaluate_cell(sors_model, x, y, AttackConfig("none", 0.0), cfg, seed=4)
    assert again.correct == result.correct and again.all_path_accuracy == result.all_path_accuracy
    assert other.correct != result.correct


def test_scoring_draws_are_independent_of_the_attacks_draws(sors_model, fmnist_test):
    """FGSM makes one forward per batch: record its path and show the reported accuracy is not the
    (much lower) accuracy on that same path."""
    x, y = fmnist_test[0][:250], fmnist_test[1][:250]
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda layer, inp: seen.append(layer.active))
        for layer in sors_model.choice_layers
    ]
    try:
        result = evaluate_cell(sors_model, x, y, AttackConfig("fgsm", EPS), EvalConfig(n_examples=250, all_paths=0))
    finally:
        for hook in hooks:
            hook.remove()
    attack_path = torch.tensor(seen[: len(sors_model.choice_layers)])
    same_path_model = freeze_path(sors_model, attack_path).eval()
    adv = attacks.build("fgsm", same_path_model, EPS)(x, y)  # what the attack produced
    with torch.no_grad():
        same_path_accuracy = (same_path_model(adv).argmax(-1) == y).float().mean().item()
    assert isinstance(seen[len(sors_model.choice_layers)], torch.Tensor)  # scoring: one path per example
    assert result.accuracy > same_path_accuracy + 0.05


# ------------------------------------------------------------------------------------------------
# Gradient-masked models, one per check


class _FlipOffGrid(torch.autograd.Function):
    """Identity forward; the gradient is honest on 8-bit images and reversed anywhere else."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(((x * 255 - torch.round(x * 255)).abs() < 1e-3).flatten(1).all(1))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (on_grid,) = ctx.saved_tensors
        return grad * torch.where(on_grid, 1.0, -1.0).view(-1, *([1] * (grad.dim() - 1)))


class FlipOffGrid(nn.Module):
    """One step from the data follows the true gradient; iterations off the data walk back."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_FlipOffGrid.apply(x))


class _Decoy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -100 * grad


class Decoy(nn.Module):
    def forward(self, x):
        return _Decoy.apply(x)


class DecoySuperNet(SuperNet):
    """One path in five reverses and amplifies the gradient: single draws mostly follow the true
    gradient, but an average over 20 draws is dominated by the decoy."""

    def __init__(self, model):
        super().__init__()
        self.body = nn.Sequential(ChoiceLayer([nn.Identity()] * 4 + [Decoy()]), model)
        self._register_choices()


def _cells(model, x, y, configs, source=None, n=200):
    cfg = EvalConfig(n_examples=n, repeats=5, all_paths=0)
    return [evaluate_cell(model, x, y, c, cfg, seed=i, source_model=source) for i, c in enumerate(configs)]


def _all_flags(results):
    cross = checks.cross_cell_flags(results)
    return {i: r.sanity_flags + cross.get(i, []) for i, r in enumerate(results)}


def test_checks_fire_on_a_non_differentiable_quantiser(lenet, fmnist_test):
    quantised = defenses.build("bit_depth", lenet, bits=8, bpda=False)  # zero gradient everywhere
    results = _cells(
        quantised,
        *fmnist_test,
        [AttackConfig("pgd", EPS), AttackConfig("transfer_pgd", EPS), AttackConfig("pgd", 1.0)],
        source=lenet,
    )
    flags = _all_flags(results)
    assert any("zero input gradient on 200/200" in f for f in flags[0])
    assert any("should beat a transferred one" in f for f in flags[0])
    assert any("eps=1" in f and "chance" in f for f in flags[2])


def test_checks_fire_when_iterations_walk_back(lenet, fmnist_test):
    results = _cells(
        FlipOffGrid(lenet),
        *fmnist_test,
        [AttackConfig("fgsm", EPS), AttackConfig("pgd", EPS, steps=1), AttackConfig("pgd", EPS)],
    )
    flags = _all_flags(results)[2]
    assert any("more than fgsm" in f for f in flags)
    assert any("more steps should not weaken" in f for f in flags)


def test_checks_fire_when_eot_is_weaker_than_pgd(lenet, fmnist_test):
    results = _cells(
        DecoySuperNet(lenet), *fmnist_test, [AttackConfig("pgd", EPS), AttackConfig("eot_pgd", EPS)], n=100
    )
    assert any("averaging gradients over draws" in f for f in _all_flags(results)[1])


def test_checks_stay_quiet_on_plain_models(lenet, sors_model, fmnist_test):
    plain = _cells(
        lenet,
        *fmnist_test,
        [
            AttackConfig("fgsm", EPS),
            AttackConfig("pgd", EPS, steps=1),
            AttackConfig("pgd", EPS),
            AttackConfig("pgd", EPS, steps=14),
            AttackConfig("pgd", 1.0),
            AttackConfig("transfer_pgd", EPS),
        ],
        source=sors_model,
    )
    randomized = _cells(
        sors_model, *fmnist_test, [AttackConfig("fgsm", EPS), AttackConfig("pgd", EPS), AttackConfig("eot_pgd", EPS)]
    )
    assert _all_flags(plain) == {i: [] for i in range(len(plain))}
    assert _all_flags(randomized) == {i: [] for i in range(len(randomized))}


def test_an_adaptive_suite_weaker_than_another_attack_is_reported(sors_model, fmnist_test):
    eot, suite = _cells(
        sors_model, *fmnist_test, [AttackConfig("eot_pgd", 100 / 255, eot_samples=4), AttackConfig("none", 0.0)], n=100
    )
    suite.attack, suite.eps, suite.attack_spec = "adaptive", eot.eps, {}  # clean accuracy posing as the suite
    assert any("should be the strongest attack" in f for f in checks.cross_cell_flags([eot, suite])[1])
    assert checks.cross_cell_flags([eot, eot]) == {}


def test_sanity_cells_are_added_to_every_model_evaluation():
    extra = checks.sanity_attacks(
        [
            AttackConfig("pgd", 0.1),
            AttackConfig("pgd", 0.2),
            AttackConfig("eot_pgd", 0.2),
            AttackConfig("transfer_mim", 0.1),
        ],
        randomized=True,
    )
    keys = {(a.name, a.eps, a.steps) for a in extra}
    assert {("fgsm", 0.1, None), ("fgsm", 0.2, None), ("pgd", 0.2, 14), ("pgd", 1.0, None), ("mim", 0.1, None)} <= keys
    assert ("pgd", 0.2, None) not in keys  # already requested


# ------------------------------------------------------------------------------------------------
# Table and command line


def test_table_lists_models_attacks_intervals_and_warnings(lenet, sors_model, fmnist_test):
    x, y = fmnist_test
    cells = [
        AttackConfig("none", 0.0),
        AttackConfig("fgsm", 25 / 255),
        AttackConfig("fgsm", EPS),
        AttackConfig("pgd", 25 / 255),
        AttackConfig("pgd", EPS),
    ]
    cfg = EvalConfig(n_examples=100, repeats=2, all_paths=4)
    by_model = {
        "lenet5": evaluate_model(lenet, x, y, cells, cfg),
        "bits8-masked": evaluate_model(
            defenses.build("bit_depth", lenet, bits=8, bpda=False), x, y, cells[:1] + cells[3:], cfg, sanity=False
        ),
        "sors_lenet5": evaluate_model(sors_model, x, y, cells, cfg),
    }
    assert any(r.extra["role"] == "sanity" and r.eps == 1.0 for r in by_model["lenet5"])
    table = format_table(by_model)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert "clean" in header and "FGSM @25/50" in header and "PGD @25/50" in header
    assert any(line.startswith("sors_lenet5") for line in lines) and "∀" in table and "±" in table
    assert "WARNING bits8-masked" in table and "zero input gradient" in table
    assert "lenet5: no warnings" in table


@pytest.fixture(scope="module")
def lenet_checkpoint(lenet, tmp_path_factory):
    cfg = make_config(model__name="lenet5", train__epochs=1)
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.pt"
    train_lib.save_checkpoint(path, train_lib.TrainState(lenet, train_lib.make_optimizer(lenet, cfg.train), 1), cfg)
    return path


# ------------------------------------------------------------------------------------------------
# Gradient orthogonality (Table 1 / Fig. 6)


def test_a_model_against_itself_has_parallel_gradients(lenet, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    hist = orthogonality.source_targets(lenet, {"itself": lenet}, x, y, bins=20)["itself"]
    assert hist.n == 64 and hist.counts[-1] == 64 and len(hist.edges) == 21
    assert hist.mean == pytest.approx(1.0, abs=1e-5) and hist.orthogonality == pytest.approx(0.0, abs=1e-5)


def test_sors_paths_are_more_orthogonal_than_independently_trained_models(lenet, sors_model, fmnist_train, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    paths = orthogonality.analyze(sors_model, x, y, n_pairs=4, generator=torch.Generator().manual_seed(0))
    assert paths.kind == "paths" and paths.counts.sum() == 4 * 64 and isinstance(paths.counts, np.ndarray)
    torch.manual_seed(1)
    other = build("lenet5", mean=(0.2860,), std=(0.3530,))
    train_lib.train_one_epoch(
        other,
        torch.optim.Adam(other.parameters(), 0.002),
        fmnist_train[0][:2000],
        fmnist_train[1][:2000],
        make_config(model__name="lenet5"),
        epoch=0,
    )
    members = orthogonality.analyze(Ensemble([lenet, other.eval()]), x, y)
    assert members.kind == "members" and members.n == 64
    assert paths.mean_abs < members.mean_abs
    assert orthogonality.analyze(lenet, x, y) is None
    json.dumps(paths.to_dict())
