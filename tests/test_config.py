"""Configuration: overrides, resolution, hashing, and one-line errors for bad input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sors import config as C
from sors.errors import ConfigError


def test_overrides_coerce_types_and_fractions():
    cfg = C.apply_overrides(
        C.RunConfig(),
        ["train.lambda=5", "attack.eps=25/255", "data.n_train=100", "train.use_gpu=false", "train.milestones=150,200"],
    )
    assert cfg.train.lambda_ == 5.0 and abs(cfg.attack.eps - 25 / 255) < 1e-12
    assert cfg.data.n_train == 100 and cfg.train.use_gpu is False and cfg.train.milestones == (150, 200)


def test_super_networks_train_three_times_the_baseline_epochs_unless_set():
    base = C.apply_overrides(C.RunConfig(), {"train.baseline_epochs": 4})
    assert C.resolve(C.apply_overrides(base, {"model.name": "lenet5"})).train.epochs == 4
    assert C.resolve(C.apply_overrides(base, {"model.name": "sors_lenet5"})).train.epochs == 12
    assert C.resolve(C.apply_overrides(base, {"model.name": "sors_lenet5", "train.epochs": 2})).train.epochs == 2


def test_hash_is_stable_and_follows_training_options_only():
    a = C.resolve(C.RunConfig())
    assert C.config_hash(a) == C.config_hash(C.resolve(C.from_dict(C.to_dict(a))))
    assert C.config_hash(a) != C.config_hash(C.apply_overrides(a, {"train.lambda": 1}))
    assert C.config_hash(a) == C.config_hash(C.apply_overrides(a, {"attack.eps": 0.3}))


@pytest.mark.parametrize(
    "override,option",
    [
        ({"data.name": "imagenet"}, "data.name"),
        ({"model.n_ops": 0}, "model.n_ops"),
        ({"train.lambda": -1}, "train.lambda"),
        ({"train.paths_per_step": 1}, "train.paths_per_step"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.epochs": -1}, "train.epochs"),
        ({"attack.eps": 1.5}, "attack.eps"),
        ({"train.lr": "fast"}, "train.lr"),
        ({"train.lamda": 3}, "train.lamda"),
    ],
)
def test_bad_values_give_one_line_naming_the_option(override, option):
    with pytest.raises(ConfigError) as err:
        C.resolve(C.apply_overrides(C.RunConfig(), override))
    message = str(err.value)
    assert message.startswith(option) and "\n" not in message


def test_a_misspelt_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean train.lambda"):
        C.apply_overrides(C.RunConfig(), ["train.lamda=3"])


@settings(max_examples=60, deadline=None)
@given(
    lam=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    k=st.integers(2, 10),
    n=st.integers(1, 10**6),
    eps=st.floats(0, 1, allow_nan=False),
)
def test_valid_overrides_round_trip_through_text(lam, k, n, eps):
    text = [f"train.lambda={lam!r}", f"train.paths_per_step={k}", f"data.n_train={n}", f"attack.eps={eps!r}"]
    cfg = C.resolve(C.apply_overrides(C.RunConfig(), text))
    assert (cfg.train.lambda_, cfg.train.paths_per_step, cfg.data.n_train, cfg.attack.eps) == (lam, k, n, eps)
    assert C.from_dict(C.to_dict(cfg)) == cfg


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_arbitrary_text_never_crashes_the_parser_with_anything_but_config_error(value):
    try:
        C.resolve(C.apply_overrides(C.RunConfig(), [f"train.batch_size={value}"]))
    except ConfigError as err:
        assert str(err).startswith("train.batch_size")
