"""Shared fixtures: real Fashion-MNIST images (the Debian package) and small trained models.

Session-scoped so the whole suite loads data and trains each reference model once.
"""

from __future__ import annotations

import os

import pytest
import torch

from sors import config as config_lib
from sors import data as data_lib
from sors import train as train_lib

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The fast test recipe (documented in README): Adam, batch 32 beats the paper's plain SGD 0.01 by far on
# a 5,000-image budget.
FAST_RECIPE = {"train.optimizer": "adam", "train.lr": 0.002, "train.batch_size": 32}


def make_config(**overrides) -> config_lib.RunConfig:
    """A resolved config on the fast test recipe; keys as ``section__option`` or dotted strings."""
    flat = dict(FAST_RECIPE)
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    flat.setdefault("data.n_train", 5000)
    flat.setdefault("data.n_test", 1000)
    return config_lib.resolve(config_lib.apply_overrides(config_lib.RunConfig(), flat))


@pytest.fixture(scope="session")
def fmnist_train():
    """5,000 real Fashion-MNIST training images (fixed subset) and labels."""
    return data_lib.load("fashion_mnist", "train", n=5000, seed=0)


@pytest.fixture(scope="session")
def fmnist_test():
    """1,000 real Fashion-MNIST test images (fixed subset) and labels."""
    return data_lib.load("fashion_mnist", "test", n=1000, seed=0)


@pytest.fixture(scope="session")
def trained_lenet(fmnist_train, fmnist_test):
    """LeNet-5 after one epoch on 5,000 images (eval mode). Returns (model, history)."""
    cfg = make_config(model__name="lenet5", train__epochs=1)
    state = train_lib.fit(cfg, data=(fmnist_train, fmnist_test))
    return state.model.eval(), state.history


@pytest.fixture(scope="session")
def trained_sors(fmnist_train, fmnist_test):
    """A short SORS-LeNet-5 run (lambda=10, K=2) on 5,000 images. Returns (model, history)."""
    cfg = make_config(
        model__name="sors_lenet5",
        model__init="perturbed_copies",
        train__epochs=3,
        train__lambda=10.0,
        train__paths_per_step=2,
    )
    state = train_lib.fit(cfg, data=(fmnist_train, fmnist_test))
    return state.model.eval(), state.history


# ---------------------------------------------------------------- pipeline fixtures (Ray, MLflow server)


@pytest.fixture(scope="session")
def ray_session():
    """ONE local Ray for the whole test session: 2 CPUs, a 200 MB object store, worker logs off."""
    import ray

    from pipeline.cluster import connection as cluster

    cluster.connect(num_cpus=2, object_store_memory=200 * 1024 * 1024, quiet=True)
    yield ray
    cluster.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (free port, SQLite backend and artifacts in tmp). Yields its URI."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: attack loops are many small ops, and on 2 cores that are
    shared (CI runners, other tenants) OpenMP spin-waits make 2 threads several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lenet(trained_lenet):
    """The trained LeNet-5 of :func:`trained_lenet`, in eval mode."""
    return trained_lenet[0]
