"""Data parallelism over torch.distributed (two real gloo processes): identical ranks, equal to one worker."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sors import config as config_lib
from sors import distributed
from sors import train as train_lib
from sors.errors import ConfigError
from tests.conftest import make_config

N_TRAIN = 197  # 4 global batches of 48 and a last one of 5, split 3 / 2 between the ranks
PER_WORKER = 24
EPOCHS = 2


def _tiny_bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def _config(batch_size: int, workers: int) -> config_lib.RunConfig:
    return make_config(
        model__name="lenet5",
        data__n_train=N_TRAIN,
        data__n_test=32,
        train__epochs=EPOCHS,
        train__optimizer="sgd",
        train__lr=0.05,
        train__momentum=0.9,
        train__batch_size=batch_size,
        train__num_workers=workers,
    )


def _fit(model: nn.Module, cfg, data, rank: int = 0, world: int = 1) -> nn.Module:
    state = train_lib.TrainState(model, train_lib.make_optimizer(model, cfg.train))
    return train_lib.fit(cfg, state, rank, world, data=data).model


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    """One data-parallel rank: its own (different) initial weights, which the broadcast must replace."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = torch.load(Path(folder) / "data.pt")
        model = _fit(_tiny_bn_model(seed=100 + rank), _config(PER_WORKER, world), data, rank, world)
        torch.save(model.state_dict(), Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_batchnorm_end_identical_and_equal_to_one_worker_on_the_global_batch(
    tmp_path, fmnist_train, fmnist_test
):
    data = ((fmnist_train[0][:N_TRAIN], fmnist_train[1][:N_TRAIN]), (fmnist_test[0][:32], fmnist_test[1][:32]))
    initial = _tiny_bn_model(seed=100).state_dict()
    one = _fit(_tiny_bn_model(seed=100), _config(2 * PER_WORKER, 1), data).state_dict()  # rank 0's start
    torch.save(data, tmp_path / "data.pt")
    # fork, not spawn: the ranks inherit the imported torch instead of importing it again (seconds each)
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    assert list(ranks[0]) == list(one)
    for name in one:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ in {name}"
        torch.testing.assert_close(
            ranks[0][name], one[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs from one worker"
        )
    assert not torch.equal(one["0.weight"], initial["0.weight"])  # it trained
    assert int(one["1.num_batches_tracked"]) == EPOCHS * 5  # 5 steps an epoch: every example, no padding
    assert not torch.equal(one["1.running_var"], initial["1.running_var"])


def test_every_example_once_per_epoch_across_ranks():
    order = torch.randperm(193)
    batches = distributed.global_batches(order, 24, 2)  # 4 x 48 + 1: the lone example joins the last batch
    assert [len(b) for b in batches] == [48, 48, 48, 49]
    seen = torch.cat([distributed.rank_slice(b, r, 2) for b in batches for r in range(2)])
    assert sorted(seen.tolist()) == list(range(193))
    assert [len(distributed.rank_slice(batches[-1], r, 2)) for r in range(2)] == [25, 24]
    with pytest.raises(ValueError, match="3 training examples cannot be shared by 4 workers"):
        distributed.global_batches(torch.arange(3), 8, 4)


def test_lr_scaling_is_validated_hashed_only_when_set_and_scales_with_the_workers():
    base = make_config(model__name="lenet5")
    linear = config_lib.apply_overrides(base, {"train.lr_scaling": "linear"})
    assert train_lib.learning_rate(linear.train, 0.0, world=4) == pytest.approx(4 * base.train.lr)
    assert train_lib.learning_rate(base.train, 0.0, world=4) == pytest.approx(base.train.lr)
    assert config_lib.flat_dict(base)["train.lr_scaling"] == "none"  # stated in the run's params
    assert config_lib.config_hash(linear) != config_lib.config_hash(base)
    before = {s: dict(config_lib.to_dict(base)[s]) for s in ("data", "model", "train")}
    del before["train"]["lr_scaling"]  # the hash as computed before the option existed: stored models keep theirs
    assert config_lib.config_hash(base) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        config_lib.resolve(config_lib.apply_overrides(base, {"train.lr_scaling": "sqrt"}))
    with pytest.raises(ConfigError, match="train.num_workers"):
        config_lib.resolve(config_lib.apply_overrides(base, {"data.n_train": 2, "train.num_workers": 3}))


@pytest.mark.ray
def test_trial_concurrency_counts_the_cluster_and_lets_a_gpu_sweep_scale_out(ray_session):
    from pipeline.cluster import connection as cluster

    cpus = int(ray_session.cluster_resources()["CPU"])
    assert cluster.growth_limit("GPU") is None  # a local Ray: no autoscaler to ask
    assert cluster.max_concurrent_trials(1, use_gpu=False, trials=10) == cpus
    assert cluster.max_concurrent_trials(2 * cpus, use_gpu=False, trials=10) == 1
    assert cluster.max_concurrent_trials(1, use_gpu=False, trials=1) == 1
    # no GPU yet and no known limit: every trial starts and asks for its GPU (what makes an autoscaler add nodes)
    assert cluster.max_concurrent_trials(1, use_gpu=True, trials=6) == 6
    assert cluster.max_concurrent_trials(1, use_gpu=True, trials=6, configured=3) == 3
    wanted = cluster.trial_resources()
    assert wanted["cpu"] == 0 and cluster.TRIAL_DRIVER_RESOURCE not in wanted  # this Ray has no such resource
