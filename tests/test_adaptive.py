"""The adaptive suite and its members on real Fashion-MNIST images: worst case per example, AA-rand
without single-draw filtering, exact expectations and exact worst case over every path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sors import attacks, models
from sors.attacks.objectives import PATH_SIGMOID_T, draw_accuracy, eot_objective
from sors.config import AttackConfig, EvalConfig
from sors.evaluation import all_path_correct, evaluate_cell, every_path_correct, path_draws
from sors.models.supernet import every_path, every_path_logits

EPS = 25 / 255
SMALL_MEMBERS = (
    ("eot_apgd", {"loss": "expected_ce", "steps": 15}),
    ("eot_apgd", {"loss": "path_margin", "random_start": True, "steps": 15}),
    ("eot_apgd", {"loss": "path_sigmoid", "steps": 15, "warm_start": True}),
    ("autoattack_rand", {"steps": 10, "eot_samples": 4}),
    ("arc", {"steps": 2, "members": 2}),
    ("square_eot", {"steps": 30, "eot_samples": 8}),
)


@pytest.fixture(scope="module")
def sors_model(trained_sors):
    return trained_sors[0]


@pytest.fixture(scope="module")
def batch(fmnist_test):
    return fmnist_test[0][:64], fmnist_test[1][:64]


def exact_accuracy(model, adv, y):
    """Per example, the exact fraction of the model's paths that classify ``adv`` correctly."""
    with torch.no_grad():
        return draw_accuracy(model, adv, y, None)


def test_the_suite_is_at_least_as_strong_as_each_member_per_example(sors_model, batch, one_thread):
    x, y = batch
    suite = attacks.build("adaptive", sors_model, EPS, members=SMALL_MEMBERS)
    with path_draws([sors_model], 7):
        adv = suite(x, y)
    final = exact_accuracy(sors_model, adv, y)
    assert set(suite.member_correct) == {
        "eot_apgd:expected_ce",
        "eot_apgd:path_margin",
        "eot_apgd:path_sigmoid",
        "autoattack_rand",
        "arc",
        "square_eot",
    }
    for label, member in suite.member_correct.items():
        ran = ~torch.isnan(member)
        assert (final[ran] <= member[ran] + 1e-6).all(), label
    # the first member starts from the clean image with exact expectations: standalone, it does
    # exactly what it did inside the suite, so the suite can only be stronger on every example
    alone = attacks.build("eot_apgd", sors_model, EPS, steps=15, restarts=1)
    with path_draws([sors_model], 7):
        alone_accuracy = exact_accuracy(sors_model, alone(x, y), y)
    assert (final <= alone_accuracy + 1e-6).all()
    assert final.mean() < exact_accuracy(sors_model, x, y).mean() - 0.2


def test_the_suite_beats_the_papers_pgd_and_eot_pgd_on_sors(sors_model, fmnist_test, one_thread):
    x, y = fmnist_test
    cfg = EvalConfig(n_examples=200, repeats=4, all_paths=0)
    suite = evaluate_cell(
        sors_model, x, y, AttackConfig("adaptive", EPS, steps=20), cfg, attack_options={"members": SMALL_MEMBERS[:3]}
    )
    for weaker in (AttackConfig("pgd", EPS), AttackConfig("eot_pgd", EPS, eot_samples=8)):
        other = evaluate_cell(sors_model, x, y, weaker, cfg)
        assert suite.accuracy < other.accuracy, weaker.name
    assert set(suite.extra["members"]) == {"eot_apgd:expected_ce", "eot_apgd:path_margin", "eot_apgd:path_sigmoid"}
    assert len(suite.example_correct) == suite.n == 200


class NoisyLinear(nn.Module):
    """A randomized toy defense: linear logits plus Gaussian noise at every forward, so a single draw
    misclassifies a clean example that most draws get right."""

    randomized = True

    def __init__(self, inner: nn.Module, sigma: float):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        logits = self.inner(x)
        return logits + self.sigma * torch.randn_like(logits)


def test_aa_rand_attacks_examples_that_single_draw_filtering_would_have_credited(lenet, fmnist_test, one_thread):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    model = NoisyLinear(lenet, sigma=4.0).eval()
    torch.manual_seed(0)
    clean_fresh = draw_accuracy(model, x, y, 64)
    with torch.no_grad():
        one_draw_wrong = model(x).argmax(1) != y
    # the examples a single-draw filter skips (returns unattacked) although most draws get them right
    credited = one_draw_wrong & (clean_fresh > 0.5)
    assert credited.sum() >= 5
    adv = attacks.build("autoattack_rand", model, EPS, steps=10, eot_samples=8)(x, y)
    assert ((adv[credited] - x[credited]).abs().flatten(1).amax(1) > 0).all(), "an example was left unattacked"
    torch.manual_seed(1)
    attacked_fresh = draw_accuracy(model, adv, y, 64)
    assert attacked_fresh[credited].mean() < clean_fresh[credited].mean() - 0.15


def test_expected_objective_over_every_path_equals_the_mean_over_a_loop_of_paths():
    torch.manual_seed(0)
    net = models.build("sors_lenet5", n_ops=2).eval()  # 2**5 = 32 paths
    x, y = torch.rand(6, 1, 28, 28, requires_grad=True), torch.randint(0, 10, (6,))
    loss, correct = eot_objective(net, "expected_ce", None)(x, y)
    grad = torch.autograd.grad(loss.sum(), x)[0]
    loop_x = x.detach().requires_grad_(True)
    probs = torch.stack([net(loop_x, p).softmax(-1) for p in every_path(net)])
    loop_loss = -probs.mean(0).gather(1, y[:, None]).squeeze(1).log()
    loop_grad = torch.autograd.grad(loop_loss.sum(), loop_x)[0]
    assert torch.allclose(loss, loop_loss, atol=1e-5)
    assert torch.allclose(grad, loop_grad, atol=1e-5)
    loop_correct = (probs.argmax(-1) == y).float().mean(0)
    assert torch.allclose(correct, loop_correct)
    # the smooth count of fooled paths: mean over paths of sigmoid(margin / T)
    sigmoid_loss, _ = eot_objective(net, "path_sigmoid", None)(x, y)
    log_probs = probs.log()
    true = log_probs.gather(2, y.expand(len(probs), -1)[..., None]).squeeze(-1)
    other = log_probs.scatter(2, y.expand(len(probs), -1)[..., None], float("-inf")).amax(-1)
    assert torch.allclose(sigmoid_loss, torch.sigmoid((other - true) / PATH_SIGMOID_T).mean(0), atol=1e-5)


def test_exact_worst_case_over_paths_equals_a_brute_force_loop(fmnist_test):
    torch.manual_seed(0)
    net = models.build("sors_lenet5", n_ops=2).eval()
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    with torch.no_grad():
        brute = torch.stack([net(x, p).argmax(-1) == y for p in every_path(net)]).all(0)
        assert every_path_logits(net, x).shape == (32, 100, 10)
    assert torch.equal(every_path_correct(net, x, y, rows_per_call=640), brute)


def test_cells_say_whether_their_worst_case_is_exact(sors_model, fmnist_test):
    x, y = fmnist_test
    exact = evaluate_cell(sors_model, x, y, AttackConfig("none", 0.0), EvalConfig(n_examples=300, repeats=2))
    sampled = evaluate_cell(
        sors_model,
        x,
        y,
        AttackConfig("none", 0.0),
        EvalConfig(n_examples=300, repeats=2, all_paths=16, exact_paths_max=100),
    )
    assert exact.all_path_exact and exact.all_path_count == 1024
    assert not sampled.all_path_exact and sampled.all_path_count == 16
    # 16 sampled paths can only miss failures: the sampled worst case is an upper bound
    assert sampled.all_path_accuracy >= exact.all_path_accuracy
    brute = all_path_correct(sors_model, x[:300], y[:300], 16, seed=0)
    assert sampled.all_path_accuracy == pytest.approx(float(brute.float().mean()))


def test_cells_keep_per_example_outcomes(sors_model, fmnist_test):
    x, y = fmnist_test
    index = torch.arange(5000, 5300)
    cell = evaluate_cell(
        sors_model, x, y, AttackConfig("fgsm", EPS), EvalConfig(n_examples=300, repeats=3), example_index=index
    )
    assert cell.example_index == list(range(5000, 5300))
    assert sum(cell.example_correct) == pytest.approx(cell.correct)
    assert all(m <= c for m, c in zip(cell.example_correct_min, cell.example_correct))
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) or abs(v * 3 - round(v * 3)) < 1e-6 for v in cell.example_correct)
    assert any(0 < v < 1 for v in cell.example_correct), "a randomized model disagrees with itself somewhere"


def test_the_reference_suite_runs_every_member_on_every_example(sors_model, batch):
    x, y = batch[0][:16], batch[1][:16]
    members = (("eot_apgd", {"steps": 3, "eot_samples": 2}), ("autoattack_rand", {"steps": 2, "eot_samples": 2}))
    fast = attacks.build("adaptive", sors_model, 100 / 255, members=members)
    reference = attacks.build("adaptive", sors_model, 100 / 255, members=members, reference=True)
    with path_draws([sors_model], 3):
        fast(x, y)
        reference(x, y)
    assert all(reference.last_stats[f"{m}.attacked"] == 16 for m in ("eot_apgd:expected_ce", "autoattack_rand"))
    # at eps = 100/255 the first member breaks examples outright: the fast suite skips them afterwards
    assert fast.last_stats["autoattack_rand.attacked"] < 16


class MixedSuper(models.SuperNet):
    """Choice layers of stackable convs and linears, and of small blocks that cannot be stacked."""

    def __init__(self, nested: bool = False):
        super().__init__()
        block = lambda: nn.Sequential(nn.Linear(16, 8), nn.Tanh())  # noqa: E731
        # the first layer's candidates share a weight shape but not their dilation: they must not be stacked
        dilated = nn.Conv2d(1, 2, 3, stride=2, padding=1, dilation=2)
        choices = [
            models.ChoiceLayer([nn.Conv2d(1, 2, 3, stride=2), dilated]),
            nn.ReLU(),
            models.ChoiceLayer([nn.Conv2d(2, 2, 1) for _ in range(2)]),
            nn.Flatten(),
            models.ChoiceLayer([nn.Linear(18, 16) for _ in range(3)]),
            nn.ReLU(),
            models.ChoiceLayer([block() for _ in range(2)]),
            models.ChoiceLayer([nn.Linear(8, 5) for _ in range(2)]),
        ]
        self.body = nn.Sequential(*choices[:6], nn.Sequential(*choices[6:])) if nested else nn.Sequential(*choices)
        self._register_choices()


@pytest.mark.parametrize("nested", [False, True], ids=["tree", "copies"])
def test_every_path_logits_and_their_input_gradient_equal_a_loop_over_paths(nested):
    torch.manual_seed(0)
    net = MixedSuper(nested).eval()
    x = torch.rand(4, 1, 7, 7, requires_grad=True)
    logits = every_path_logits(net, x)
    loop = torch.stack([net(x, p) for p in every_path(net)])
    assert logits.shape == loop.shape == (48, 4, 5)
    assert torch.allclose(logits, loop, atol=1e-6)
    weights = torch.rand_like(loop)
    (grad,) = torch.autograd.grad((logits * weights).sum(), x)
    (loop_grad,) = torch.autograd.grad((loop * weights).sum(), x)
    assert torch.allclose(grad, loop_grad, atol=1e-6)


def test_the_strength_check_runs_stronger_attacks_from_the_suites_points_and_reports_their_gain(
    sors_model, batch, monkeypatch
):
    from bench import strength
    from bench.harness import Settings

    x, y = batch
    objective, encode = strength.targeted_objective(sors_model, classes=10)
    loss, correct = objective(x[:8], encode(y[:8], y[:8]))  # "target" = the true class: every margin is 0
    assert torch.allclose(loss, torch.full_like(loss, 0.5)) and torch.equal(
        correct, exact_accuracy(sors_model, x[:8], y[:8])
    )

    monkeypatch.setattr(strength, "trained_sors", lambda device: sors_model)
    rows = {row.name: row for row in strength.case_strength(Settings(device=torch.device("cpu"), quick=True))}
    attacked = [
        rows[name].value
        for name in (
            "strength.path_sigmoid_x3",
            "strength.targeted_top1",
            "strength.targeted_top2",
            "strength.targeted_top3",
            "strength.targeted_top1_cold",
        )
    ]
    suite, worst = rows["strength.suite"].value, rows["strength.worst_case"].value
    assert worst <= min(attacked + [suite])  # per example the worst of all of them
    assert rows["strength.gain_points"].value == pytest.approx(suite - worst, abs=0.011)


def test_per_path_margins_and_the_lenet_tree_equal_a_loop_over_paths():
    # the margin losses read logit differences (no softmax) and the tree runs max-pool before ReLU:
    # both must give the loop's values and input gradients
    torch.manual_seed(1)
    net = models.build("sors_lenet5", n_ops=2).eval()  # ReLU -> MaxPool after both convolutions
    x, y = torch.rand(5, 1, 28, 28, requires_grad=True), torch.randint(0, 10, (5,))
    loop_x = x.detach().requires_grad_(True)
    log_probs = torch.stack([net(loop_x, p).log_softmax(-1) for p in every_path(net)])
    true = log_probs.gather(2, y.expand(len(log_probs), -1)[..., None]).squeeze(-1)
    other = log_probs.scatter(2, y.expand(len(log_probs), -1)[..., None], float("-inf")).amax(-1)
    loop_loss = torch.clamp(other - true, max=1.0).mean(0)
    loss, _ = eot_objective(net, "path_margin", None)(x, y)
    assert torch.allclose(loss, loop_loss, atol=1e-5)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    (loop_grad,) = torch.autograd.grad(loop_loss.sum(), loop_x)
    assert torch.allclose(grad, loop_grad, atol=1e-5)


def test_the_sampled_mode_samples_every_members_draws_and_its_gap_is_scored_exactly(sors_model, monkeypatch):
    from bench import sampled
    from bench.harness import Settings
    from sors.attacks.eot import draws_for

    suite = attacks.build("adaptive", sors_model, 25 / 255, members=sampled.sampled_members(), exact_paths_max=0)
    members = suite.members()
    assert len(members) == len(sampled.DEFAULT_MEMBERS)
    # enumeration off: no member takes an exact expectation over the (enumerable) 1,024 paths
    assert all(draws_for(member, 16) == 16 for _, member in members)
    assert draws_for(attacks.build("adaptive", sors_model, 25 / 255), 16) is None  # the default enumerates

    monkeypatch.setattr(sampled, "trained_sors", lambda device: sors_model)
    rows = {row.name: row for row in sampled.case_sampled(Settings(device=torch.device("cpu"), quick=True))}
    gap = rows["sampled.sampled"].value - rows["sampled.exact"].value
    assert rows["sampled.gap_points"].value == pytest.approx(gap, abs=0.011)
    assert rows["sampled.time_ratio"].value > 0
