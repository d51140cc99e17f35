"""``sors bench --cases adaptive``: images/s of the adaptive suite against the straightforward
implementation of the same attacks (every member on every example, each EOT draw -- and, for the
exact expectation over SORS-LeNet-5's 1,024 paths, each path -- as a sequential forward, no early
stop), on a trained SORS-LeNet-5 and real
Fashion-MNIST test images at eps = 25/255 (the main job's hardest cell: most survivors).

A trained model matters: an untrained one is broken at once and every early stop looks free. The
case trains a short SORS-LeNet-5 (5,000 images, 3 epochs, the test recipe) unless
``SORS_BENCH_CHECKPOINT`` names a checkpoint of one.
"""

from __future__ import annotations

import os

import torch

from bench.harness import Row, Settings, measure, median, paired_ratio
from sors import attacks, config, data, train

EPS = 25 / 255


def trained_sors(device: torch.device) -> torch.nn.Module:
    """A trained SORS-LeNet-5 in eval mode: ``SORS_BENCH_CHECKPOINT`` or a short training run."""
    checkpoint = os.environ.get("SORS_BENCH_CHECKPOINT")
    if checkpoint:
        return train.load_checkpoint(checkpoint, device=device)[0].eval()
    overrides = {
        "model.name": "sors_lenet5",
        "model.init": "perturbed_copies",
        "train.optimizer": "adam",
        "train.lr": 0.002,
        "train.batch_size": 32,
        "train.epochs": 3,
        "data.n_train": 5000,
        "data.n_test": 200,
    }
    cfg = config.resolve(config.apply_overrides(config.RunConfig(), overrides))
    return train.fit(cfg, device=device).model.eval()


def case_adaptive(s: Settings) -> list[Row]:
    """The suite vs its reference on ``--eot-batch`` (64; quick: 8) test images, default members."""
    model = trained_sors(s.device)
    batch = s.eot_batch or 64
    x, y = data.load("fashion_mnist", "test", n=batch, seed=1)
    x, y = x.to(s.device), y.to(s.device)
    options = {"steps": 2, "members": (("eot_apgd", {"steps": 2}),)} if s.quick else {}
    suite = attacks.build("adaptive", model, EPS, **options)
    reference = attacks.build("adaptive", model, EPS, reference=True, **options)
    times = measure(
        {"suite": lambda: suite(x, y), "reference": lambda: reference(x, y)},
        s.device,
        repeats=1 if not s.quick else s.repeats,
        warmup=0,
    )
    rate = {k: round(batch / median(v), 2) for k, v in times.items()}
    detail = {
        "model": "sors_lenet5 (trained)",
        "batch": batch,
        "eps": "25/255",
        **{f"{k}_images_per_s": v for k, v in rate.items()},
    }
    return [Row("adaptive.speedup_vs_reference", round(paired_ratio(times, "reference", "suite"), 3), "x", detail)]
