"""Faults injected into real runs (local Ray, a real MLflow server, real Parquet): a Ray Train worker
SIGKILLed mid-epoch, the sweep driver SIGKILLed mid-sweep, the evaluation fan-out SIGKILLed mid-way.
Every fault test is marked ``fault``: ``pytest -m fault`` runs them alone (the others: test_sync,
test_preflight)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.store import results
from sors import config as config_lib
from sors import train as train_lib
from tests.faults import (
    TINY,
    is_ray_worker,
    kill_driver,
    make_epoch_recorder,
    registered_epoch,
    run_driver,
    spawn_driver,
    store_rows,
    tiny_checkpoint,  # noqa: F401 -- a fixture
    wait_for,
    wait_for_dead_jobs,
    write_preset,
)

pytestmark = pytest.mark.timeout(400)


# ---------------------------------------------------------------- 1. Ray Train worker killed mid-epoch


@pytest.mark.fault
@pytest.mark.ray
def test_a_killed_train_worker_resumes_from_its_last_checkpoint(ray_session, tmp_path):
    from pipeline.cluster import trainer

    epochs = 4
    cfg = config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(),
            dict(TINY, **{"model.name": "sors_lenet5", "data.n_train": 1024, "train.epochs": epochs}),
        )
    )
    log, storage, name = tmp_path / "epochs.log", tmp_path / "ray", "killed-worker"
    killed = {}

    def killer():
        def ready():  # a checkpoint is registered and the worker that wrote it is still training
            if not log.is_file() or registered_epoch(storage / name) < 1:
                return None
            pid = int(log.read_text().split()[1])
            return pid if is_ray_worker(pid) else None

        pid = wait_for(ready, 240, "the first registered checkpoint")
        killed["registered"] = registered_epoch(storage / name)
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcome = trainer.train_on_ray(cfg, name, str(storage), epoch_hook=make_epoch_recorder(str(log)), max_failures=1)
    thread.join(timeout=5)
    assert killed.get("pid"), "the worker was never killed"

    entries = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    first = [e for e, pid in entries if pid == killed["pid"]]
    second = [e for e, pid in entries if pid != killed["pid"]]
    assert len({pid for _, pid in entries}) == 2, entries  # one replacement worker
    assert first == list(range(1, len(first) + 1)) and len(first) < epochs, entries  # killed mid-run
    restored_from = second[0] - 1
    assert second == list(range(second[0], epochs + 1)), entries
    # restored from the last registered checkpoint (not from scratch), and no registered epoch was redone
    assert killed["registered"] <= restored_from <= len(first), (killed, entries)

    model, _, payload = train_lib.load_checkpoint(outcome.checkpoint_uri)
    assert payload["epoch"] == epochs == outcome.metrics["epoch"]
    assert [h["epoch"] for h in payload["history"]] == list(range(1, epochs + 1))
    assert all(math.isfinite(h[k]) for h in payload["history"] for k in ("loss", "ce", "ortho", "clean_acc"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- 2. sweep driver killed mid-sweep


@pytest.mark.fault
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)  # kill wait (300 s) + clean-up wait (120 s) + resumed driver (300 s), each bounded
def test_a_killed_sweep_driver_resumes_only_unfinished_trials(ray_session, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.store.records import load_record, record_path

    # One trial's Ray Train run takes every CPU, so Tune runs the two trials one after the other: the
    # driver is killed once one trial is finished (trained, evaluated, tracked) and the other has started.
    workers = int(ray_session.cluster_resources()["CPU"])
    preset = write_preset(
        tmp_path / "two.yaml",
        "drvkill",
        [
            {"name": "wide", "label": "LeNet-5 (DP)", "set": {"model.name": "lenet5", "train.num_workers": workers}},
            {
                "name": "long",
                "label": "LeNet-5 (2 ep)",
                "set": {"model.name": "lenet5", "train.epochs": 2, "train.seed": 1},
            },
        ],
        attacks=(),
    )
    results_dir = tmp_path / "results"
    common = ["--results-dir", str(results_dir), "--tracking-uri", mlflow_server, "--no-progress"]

    def one_finished_other_started():
        records = {t: load_record(str(results_dir), "drvkill", t) for t in ("wide", "long")}
        finished = [t for t, r in records.items() if r and (r.get("tracking") or {}).get("status") == "complete"]
        started = [t for t, r in records.items() if r is None and any((results_dir / "ray").glob(f"drvkill.{t}.*"))]
        return (finished[0], started[0]) if len(finished) == 1 and started else None

    address = ray_session.get_runtime_context().gcs_address
    driver = spawn_driver(["sweep", str(preset), "--ray-address", address, *common], tmp_path)
    try:
        finished, unfinished = wait_for(one_finished_other_started, 300, "one trial finished, the other started", 0.1)
    finally:
        kill_driver(driver)
    assert not record_path(str(results_dir), "drvkill", unfinished).exists(), "both finished before the kill"
    wait_for_dead_jobs(ray_session)

    done_record = record_path(str(results_dir), "drvkill", finished).read_bytes()
    done_ckpt = Path(json.loads(done_record)["checkpoint_uri"])
    done_ckpt_mtime = done_ckpt.stat().st_mtime_ns
    done_train_files = sorted(p.name for p in done_ckpt.parent.parent.iterdir())
    cells_before = {r["cell_id"]: r["created_at"] for r in store_rows(results_dir)}
    assert len(cells_before) == 1  # the finished trial's (clean accuracy) cell

    code, out = run_driver(["sweep", str(preset), "--resume", "--ray-address", address, *common], tmp_path, 300)
    assert code == 0, out[-3000:]
    assert "1 trial(s) run, 1 already done" in out

    # the finished trial was not retrained, re-evaluated or re-recorded
    assert record_path(str(results_dir), "drvkill", finished).read_bytes() == done_record
    assert done_ckpt.stat().st_mtime_ns == done_ckpt_mtime
    assert sorted(p.name for p in done_ckpt.parent.parent.iterdir()) == done_train_files
    rows = store_rows(results_dir)
    assert len(rows) == 2 and len({r["cell_id"] for r in rows}) == 2  # one cell per trial, once each
    assert all({r["cell_id"]: r["created_at"] for r in rows}[c] == t for c, t in cells_before.items())
    client = MlflowClient(mlflow_server)
    done_run = json.loads(done_record)["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(done_run, "loss")] == list(
        range(1, json.loads(done_record)["epochs"] + 1)
    )

    # the unfinished trial finished, once, with its full epoch count, and is tracked
    record = load_record(str(results_dir), "drvkill", unfinished)
    assert record["evaluated"] and record["tracking"]["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == list(range(1, record["epochs"] + 1))
    runs = client.search_runs([client.get_run(done_run).info.experiment_id])
    trials = [r for r in runs if r.data.tags.get("sors.run_role") == "trial"]
    assert sorted((r.info.run_name, r.info.status) for r in trials) == [("long", "FINISHED"), ("wide", "FINISHED")]
    (parent,) = [r for r in runs if r.data.tags.get("sors.run_role") == "sweep"]  # one, reused by the resume
    assert parent.info.status == "FINISHED" and {r.data.tags["mlflow.parentRunId"] for r in trials} == {
        parent.info.run_id
    }


# ---------------------------------------------------------------- 3. evaluation fan-out killed mid-way


@pytest.mark.fault
@pytest.mark.ray
def test_a_killed_fanout_reruns_only_the_missing_cells(ray_session, mlflow_server, tiny_checkpoint, tmp_path, capsys):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    results_dir = tmp_path / "results"
    args = [
        "evaluate",
        str(tiny_checkpoint),
        "--results-dir",
        str(results_dir),
        "--tracking-uri",
        mlflow_server,
        "--name",
        "fanout-kill",
        "--no-progress",
        "--set",
        "eval.n_examples=64",
        "--set",
        "eval.repeats=1",
    ]
    total = 17  # clean + (adaptive, fgsm, pgd, mim) x 4 eps, the default plan for Fashion-MNIST
    driver = spawn_driver([*args, "--ray-address", ray_session.get_runtime_context().gcs_address], tmp_path)
    try:
        wait_for(lambda: 0 < len(results.files(results_dir / "cells")) < total, 240, "the first cells", 0.02)
    finally:
        kill_driver(driver)
    wait_for_dead_jobs(ray_session)
    done_before = {r["cell_id"]: r["created_at"] for r in store_rows(results_dir)}
    assert 0 < len(done_before) < total, len(done_before)

    # a writer killed mid-write leaves at most a hidden temporary file: plant one, truncated, to be sure
    folder = results.files(results_dir / "cells")[0].parent
    (folder / ".0123456789abcdef01234567.deadbeef.tmp").write_bytes(b"PAR1\x00\x01half a file")

    assert cli.main(args) == 0
    capsys.readouterr()
    rows = store_rows(results_dir)
    assert len(rows) == total and len({r["cell_id"] for r in rows}) == total  # exactly one row per cell
    by_id = {r["cell_id"]: r["created_at"] for r in rows}
    assert all(by_id[cell] == created for cell, created in done_before.items())  # only the missing ones ran
    # every reader sees whole rows only: the temporary file is invisible to pyarrow, pandas and DuckDB
    cells = results_dir / "cells"
    assert pads.dataset(str(cells), format="parquet", partitioning="hive").count_rows() == total
    assert len(pd.read_parquet(cells)) == total
    assert (
        duckdb.sql(f"select count(*) from read_parquet('{cells}/**/*.parquet', hive_partitioning=true)").fetchall()[0][
            0
        ]
        == total
    )
    assert not [p for p in cells.rglob("*") if p.is_file() and p.suffix != ".parquet" and not p.name.startswith(".")]
