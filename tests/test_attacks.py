"""Attacks: parity with torchattacks, closed forms, bounds, mode handling, EOT batching, C&W."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sors import attacks
from sors.config import AttackConfig, EvalConfig
from sors.errors import ConfigError
from sors.evaluation import evaluate_cell, path_draws
from sors.models import SuperNet, freeze_path

EPS = 50 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@pytest.fixture(scope="module")
def sors_model(trained_sors):
    return trained_sors[0]


def _torchattacks_reference(name: str, model: nn.Module, eps: float):
    import torchattacks

    reference = {
        "fgsm": lambda: torchattacks.FGSM(model, eps=eps),
        "pgd": lambda: torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=7, random_start=False),
        "mim": lambda: torchattacks.MIFGSM(model, eps=eps, alpha=eps / 10, steps=10, decay=1.0),
    }
    return reference[name]()


@pytest.mark.parametrize("name", ["fgsm", "pgd", "mim"])
def test_matches_torchattacks_on_1000_test_images(lenet, fmnist_test, name):
    x, y = fmnist_test
    ours = attacks.build(name, lenet, EPS)(x, y)
    reference = _torchattacks_reference(name, lenet, EPS)(x, y)
    assert len(y) == 1000
    assert abs(accuracy(lenet, ours, y) - accuracy(lenet, reference, y)) <= 0.005
    assert accuracy(lenet, ours, y) < accuracy(lenet, x, y) - 0.3  # the attack does something


def test_pgd_matches_torchattacks_on_a_fixed_path_of_a_super_network(sors_model, fmnist_test):
    x, y = fmnist_test
    fixed = freeze_path(sors_model, sors_model.sample_path(torch.Generator().manual_seed(3))).eval()
    ours = attacks.build("pgd", fixed, EPS)(x, y)
    reference = _torchattacks_reference("pgd", fixed, EPS)(x, y)
    assert abs(accuracy(fixed, ours, y) - accuracy(fixed, reference, y)) <= 0.005


def test_fgsm_on_a_linear_model_equals_the_closed_form(fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    weight, bias = linear[1].weight.detach(), linear[1].bias.detach()
    probs = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    grad = (probs - F.one_hot(y, 10).float()) @ weight  # dCE/dx for logits W x + b
    expected = (x + EPS * grad.sign().view_as(x)).clamp(0, 1)
    assert torch.allclose(attacks.build("fgsm", linear, EPS)(x, y), expected, atol=1e-6)


class ModeRecorder(nn.Module):
    """Records the training flag seen by every forward, and the batch sizes."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.modes: list[bool] = []
        self.sizes: list[int] = []
        self.per_example: list[bool] = []

    def forward(self, x, *args):
        self.modes.append(self.training)
        self.sizes.append(x.shape[0])
        nets = [m for m in self.inner.modules() if isinstance(m, SuperNet)]
        self.per_example.append(any(net.per_example for net in nets))
        return self.inner(x, *args)


FAST_MEMBERS = (
    ("eot_apgd", {"steps": 2}),
    ("autoattack_rand", {"steps": 2, "eot_samples": 2}),
    ("arc", {"steps": 1, "members": 2, "eot_samples": 2}),
    ("square_eot", {"steps": 3, "eot_samples": 2}),
)
FAST_OPTIONS = {
    "cw": {"steps": 5, "binary_search_steps": 1},
    "autoattack_rand": {"steps": 3, "eot_samples": 2},
    "eot_pgd": {"eot_samples": 4},
    "eot_apgd": {"steps": 3, "eot_samples": 2},
    "arc": {"steps": 2, "members": 2, "eot_samples": 2},
    "square_eot": {"steps": 5, "eot_samples": 2},
    "adaptive": {"steps": 2, "eot_samples": 2, "select_draws": 2, "members": FAST_MEMBERS},
}


@pytest.mark.parametrize("name", attacks.available())
def test_every_attack_stays_in_bounds_and_restores_mode_flags(sors_model, lenet, fmnist_test, name):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    model = ModeRecorder(sors_model)
    model.train()
    model.inner.body[0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    options = dict(FAST_OPTIONS.get(name, {}))
    if name.startswith("transfer"):
        options["source"] = lenet
    adversary = attacks.build(name, model, EPS, **options)
    try:
        adv = adversary(x, y)
    finally:
        after = [m.training for m in model.modules()]
        model.eval()
    assert after == before
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    if adversary.norm == "linf":
        assert (adv - x).abs().max() <= EPS + 1e-6
    assert not any(model.modes), "the attack ran the model in training mode"
    spec = adversary.spec
    assert spec["name"] == name and {"norm", "eps", "steps", "eot_samples"} <= set(spec)


def test_eot_with_one_sample_is_exactly_pgd(sors_model, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    with path_draws([sors_model], seed=11):
        pgd = attacks.build("pgd", sors_model, EPS)(x, y)
    with path_draws([sors_model], seed=11):
        eot = attacks.build("eot_pgd", sors_model, EPS, eot_samples=1)(x, y)
    assert torch.equal(pgd, eot)


def test_eot_runs_its_samples_as_one_batched_forward_with_a_path_per_example(sors_model, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    model = ModeRecorder(sors_model)
    attacks.build("eot_pgd", model, EPS, eot_samples=20)(x, y)
    assert model.sizes == [20 * 8] * 7 and all(model.per_example)
    model = ModeRecorder(sors_model)
    attacks.build("ensemble_pgd", model, EPS, eot_samples=3)(x, y)
    assert model.sizes == [8] * (3 * 7) and not any(model.per_example)  # Table 9: k paths, one per forward


def test_eot_is_at_least_as_strong_as_pgd_on_a_sors_model(sors_model, fmnist_test):
    x, y = fmnist_test
    cfg = EvalConfig(n_examples=200, repeats=5, all_paths=0)
    pgd = evaluate_cell(sors_model, x, y, AttackConfig("pgd", 25 / 255), cfg, seed=1)
    eot = evaluate_cell(sors_model, x, y, AttackConfig("eot_pgd", 25 / 255), cfg, seed=1)
    assert eot.eot_samples == 20 and pgd.eot_samples == 1
    assert eot.accuracy <= pgd.ci_high


def test_cw_reaches_near_zero_accuracy_on_lenet_and_reports_l2(lenet, fmnist_test):
    x, y = fmnist_test
    options = {"binary_search_steps": 6, "lr": 0.1, "initial_const": 0.1}
    result = evaluate_cell(
        lenet, x, y, AttackConfig("cw", 0.0, steps=50), EvalConfig(n_examples=30), attack_options=options
    )
    assert result.norm == "l2" and result.steps == 50
    assert result.accuracy <= 0.05
    assert 0 < result.extra["mean_l2"] < 5
    assert result.extra["max_linf"] > EPS  # unbounded: no L-inf budget applies


def test_cw_paper_defaults_depend_on_the_data_set(lenet):
    assert (
        attacks.build("cw", lenet, 0, dataset="fashion_mnist").spec["steps"],
        attacks.build("cw", lenet, 0, dataset="fashion_mnist").spec["kappa"],
    ) == (10000, 0.0)
    spec = attacks.build("cw", lenet, 0, dataset="cifar100").spec
    assert (spec["steps"], spec["kappa"]) == (100, 1.0)
    assert attacks.build("cw", lenet, 0, dataset="cifar10").spec["kappa"] == 0.0


def test_paper_defaults_of_the_gradient_attacks(lenet):
    pgd = attacks.build("pgd", lenet, 0.2).spec
    mim = attacks.build("mim", lenet, 0.2).spec
    assert (pgd["steps"], pgd["step_size"]) == (7, pytest.approx(0.05))
    assert (mim["steps"], mim["step_size"], mim["decay"]) == (10, pytest.approx(0.02), 1.0)
    assert attacks.build("eot_pgd", lenet, 0.2).spec["eot_samples"] == 20
    assert attacks.build("autoattack_rand", lenet, 0.2).spec["eot_samples"] == 20


def test_eps_grids_are_the_papers():
    assert [round(e * 255) for e in attacks.EPS_GRIDS["fashion_mnist"]] == [25, 50, 75, 100]
    assert [round(e * 255) for e in attacks.EPS_GRIDS["mnist"]] == [25, 50, 75, 100]
    assert [round(e * 255) for e in attacks.EPS_GRIDS["cifar10"]] == [1, 2, 4, 8]
    assert attacks.EPS_GRIDS["cifar100"] == attacks.EPS_GRIDS["cifar10"]


@pytest.mark.parametrize(
    "call, option",
    [
        (lambda m: attacks.build("pgdx", m, 0.1), "attack.name"),
        (lambda m: attacks.build("pgd", m, 1.5), "attack.eps"),
        (lambda m: attacks.build("pgd", m, -0.1), "attack.eps"),
        (lambda m: attacks.build("pgd", m, 0.1, stepz=3), "attack.stepz"),
        (lambda m: attacks.build("pgd", m, 0.1, steps=0), "attack.steps"),
        (lambda m: attacks.build("transfer_pgd", m, 0.1), "attack.source"),
    ],
)
def test_bad_attack_settings_name_the_option(lenet, call, option):
    with pytest.raises(ConfigError) as err:
        call(lenet)
    assert err.value.option == option


def test_autoattack_rand_is_at_least_as_strong_as_pgd(lenet, fmnist_test):
    x, y = fmnist_test
    cfg = EvalConfig(n_examples=200)
    pgd = evaluate_cell(lenet, x, y, AttackConfig("pgd", 25 / 255), cfg)
    auto = evaluate_cell(lenet, x, y, AttackConfig("autoattack_rand", 25 / 255, steps=20, eot_samples=1), cfg)
    assert auto.accuracy <= pgd.accuracy + 0.01
    assert auto.attack_spec["steps"] == 20


def test_transfer_crafts_on_the_source_and_is_weaker_than_white_box(lenet, sors_model, fmnist_test):
    x, y = fmnist_test
    cfg = EvalConfig(n_examples=200)
    white = evaluate_cell(lenet, x, y, AttackConfig("pgd", EPS), cfg)
    transfer = evaluate_cell(lenet, x, y, AttackConfig("transfer_pgd", EPS), cfg, source_model=sors_model)
    assert transfer.attack_spec["base"] == "pgd" and transfer.attack_spec["source"] == type(sors_model).__name__
    assert white.accuracy < transfer.accuracy
