"""Training on real Fashion-MNIST images, checkpoints, and safe loading."""

import pytest
import torch

from sors import config as C
from sors import train as T
from tests.conftest import make_config


def test_one_epoch_of_lenet5_on_5000_images_beats_70_percent(trained_lenet):
    _, history = trained_lenet
    assert history[-1]["clean_acc"] > 0.70, history


def test_a_short_sors_run_lowers_its_ce_and_reaches_three_times_chance(trained_sors):
    model, history = trained_sors
    assert history[-1]["ce"] < history[0]["ce"], history
    assert history[-1]["clean_acc"] >= 0.30, history
    assert history[-1]["ortho"] >= 0 and 0 <= history[-1]["grad_abs_cos"] <= 1
    for key in ("loss", "ce", "ortho", "kd", "train_acc", "clean_acc", "grad_abs_cos", "grad_cos2", "lr", "seconds"):
        assert key in history[-1]


def test_checkpoint_round_trip_and_resume(tmp_path, fmnist_train, fmnist_test):
    cfg = make_config(model__name="sors_lenet5", model__n_ops=2, data__n_train=256, train__epochs=1, train__lambda=1.0)
    data = ((fmnist_train[0][:256], fmnist_train[1][:256]), fmnist_test)
    state = T.fit(cfg, data=data)
    path = T.save_checkpoint(tmp_path / "ckpt.pt", state, cfg)
    raw = torch.load(path, weights_only=True)  # loads with the safe unpickler
    assert raw["epoch"] == 1 and raw["config"]["train"]["lambda"] == 1.0
    resumed, cfg2, _ = T.load_checkpoint(path, with_optimizer=True)
    assert cfg2 == cfg and resumed.epoch == 1
    x = fmnist_test[0][:4]
    fixed = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(resumed.model(x, fixed), state.model(x, fixed))
    longer = C.apply_overrides(cfg, {"train.epochs": 2})
    T.fit(longer, state=resumed, data=data)
    assert resumed.epoch == 2 and [h["epoch"] for h in resumed.history] == [1, 2]


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_payload_in_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "config": {}, "x": _Payload()}, bad)
    with pytest.raises(T.CheckpointError, match="evil.pt: refused"):
        T.read_checkpoint(bad)


def test_a_truncated_checkpoint_gives_one_line_naming_the_file(tmp_path, trained_lenet):
    cfg = make_config(model__name="lenet5", train__epochs=1)
    state = T.TrainState(trained_lenet[0], T.make_optimizer(trained_lenet[0], cfg.train), 1, [])
    path = T.save_checkpoint(tmp_path / "full.pt", state, cfg)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(T.CheckpointError) as err:
        T.read_checkpoint(cut)
    assert "cut.pt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(T.CheckpointError, match="no such checkpoint"):
        T.read_checkpoint(tmp_path / "missing.pt")


def test_ensemble_members_train_on_their_own_loss(fmnist_train, fmnist_test):
    cfg = make_config(model__name="ensemble", model__members="lenet5*2", data__n_train=512, train__epochs=1)
    data = ((fmnist_train[0][:512], fmnist_train[1][:512]), fmnist_test)
    state = T.fit(cfg, data=data)
    first, second = state.model.members
    assert not torch.equal(first.body[1].weight, second.body[1].weight)  # independent initialisation
    assert 0 <= state.history[-1]["grad_abs_cos"] <= 1


def test_learning_rate_warms_up_and_steps_down_at_milestones():
    train = C.apply_overrides(
        C.RunConfig(), {"train.lr": 0.1, "train.milestones": "2,4", "train.warmup_epochs": 1}
    ).train
    assert T.learning_rate(train, 0.5) == pytest.approx(0.05, rel=0.01)
    assert T.learning_rate(train, 1.5) == pytest.approx(0.1)
    assert T.learning_rate(train, 3) == pytest.approx(0.01)
    assert T.learning_rate(train, 5) == pytest.approx(0.001)


def test_all_ranks_draw_the_same_paths_each_step():
    a = T.step_generator(3, 1, 7)
    b = T.step_generator(3, 1, 7)
    assert torch.equal(torch.randint(0, 4, (10,), generator=a), torch.randint(0, 4, (10,), generator=b))
