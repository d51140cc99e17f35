"""The ``fanout`` case of ``sors bench``: evaluation cells as Ray tasks vs in-process, on a local
2-CPU Ray and on a simulated 2-node cluster (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import math
import os
import time

import torch

from bench.harness import Row, Settings, median
from sors import config as config_lib
from sors import data as data_lib
from sors import evaluation, kernels, models


def bench_cell(n_examples: int, seed: int = 0, threads: int = 1) -> dict[str, float]:
    """One evaluation cell as the pipeline runs it: PGD on sors_lenet5 over ``n_examples`` test
    images through :func:`sors.evaluation.evaluate_cell`. CPU, ``threads`` torch threads. Returns its accuracy and in-cell seconds."""
    start, saved_threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _cell(n_examples, seed, start)
    finally:
        torch.set_num_threads(saved_threads)


def _cell(n_examples: int, seed: int, start: float) -> dict[str, float]:
    kernels.retain_freed_memory()  # the same allocator setting in a Ray worker as in this process
    torch.manual_seed(seed)
    model = models.build("sors_lenet5").eval()
    try:
        images, labels = data_lib.load("fashion_mnist", "test", n=n_examples, seed=seed)
    except Exception:  # noqa: BLE001 -- no data set on this machine: random images cost the same
        g = torch.Generator().manual_seed(seed)
        images, labels = (
            torch.rand(n_examples, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n_examples,), generator=g),
        )
    result = evaluation.evaluate_cell(
        model,
        images,
        labels,
        config_lib.AttackConfig(name="pgd", eps=0.1),
        config_lib.EvalConfig(n_examples=n_examples, repeats=2, all_paths=4),
        seed=seed,
    )
    accuracy = float(result.accuracy)
    return {"accuracy": accuracy, "seconds": time.perf_counter() - start}


def calibrate_cell(seconds: float) -> int:
    """Test images per cell so that one cell takes about ``seconds`` here (1 thread): grow the cell
    until it takes a fifth of that, then scale linearly (the first call only warms up)."""
    bench_cell(8)
    n = 32
    while True:
        took = bench_cell(n)["seconds"]
        if took >= seconds / 5 or n >= 1 << 16:
            break
        n *= 4
    return max(8, int(math.ceil(n * seconds * 1.05 / took)))


def _ray_cell():
    import ray

    return ray.remote(num_cpus=1, max_retries=0)(bench_cell)


def case_fanout(s: Settings) -> list[Row]:
    """Cells through Ray tasks vs in-process (serial: overhead per cell), then all cells at once on a
    local 2-CPU Ray and on a simulated 2-node cluster (scaling = serial seconds / wall seconds)."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        return [Row("fanout.overhead", None, "of wall time", {"note": "ray not installed"})]
    n = calibrate_cell(s.cell_seconds)
    cells = s.fanout_cells
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray_options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, **ray_options)
    try:
        task = _ray_cell()
        ray.get([task.remote(8, seed=i) for i in range(2)])  # warm-up: start both workers, import torch
        local, remote, inner = [], [], []
        for i in range(cells):  # alternate which side goes first
            for side in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
                start = time.perf_counter()
                if side == "local":
                    bench_cell(n, seed=i)
                    local.append(time.perf_counter() - start)
                else:
                    inner.append(ray.get(task.remote(n, seed=i))["seconds"])
                    remote.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get([task.remote(n, seed=i) for i in range(cells)])
        parallel = time.perf_counter() - start
    finally:
        ray.shutdown()
    cluster_wall = None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
        ray.init(address=cluster.address, **ray_options)
        task = _ray_cell()
        ray.get([task.options(scheduling_strategy="SPREAD").remote(8, seed=i) for i in range(2)])
        start = time.perf_counter()
        ray.get([task.options(scheduling_strategy="SPREAD").remote(n, seed=i) for i in range(cells)])
        cluster_wall = time.perf_counter() - start
    finally:
        ray.shutdown()
        cluster.shutdown()
    serial = sum(local)
    overhead = median([(r - l) / r for r, l in zip(remote, local)])
    detail = {
        "cells": cells,
        "images_per_cell": n,
        "local_cell_s": round(median(local), 2),
        "ray_cell_s": round(median(remote), 2),
        "in_task_s": round(median(inner), 2),
    }
    return [
        Row("fanout.overhead", round(overhead, 4), "of wall time", detail),
        Row(
            "fanout.local_2cpu_scaling",
            round(serial / parallel, 3),
            "x serial",
            {"wall_s": round(parallel, 2), "serial_s": round(serial, 2), "ideal": min(cells, 2)},
        ),
        Row(
            "fanout.cluster_2node_scaling",
            round(serial / cluster_wall, 3),
            "x serial",
            {"wall_s": round(cluster_wall, 2), "nodes": 2, "ideal": min(cells, 2)},
        ),
    ]
