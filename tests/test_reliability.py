"""Faults injected into real runs (local Ray, a real MLflow server, real Parquet), and the security
defaults. Every fault test is marked ``fault``: ``pytest -m fault`` runs them alone.

| fault                                   | test                                                        |
| --------------------------------------- | ----------------------------------------------------------- |
| Ray Train worker SIGKILLed mid-epoch     | test_a_killed_train_worker_resumes_from_its_last_checkpoint |
| sweep driver SIGKILLed mid-sweep         | test_a_killed_sweep_driver_resumes_only_unfinished_trials    |
| evaluation fan-out SIGKILLed mid-way     | test_a_killed_fanout_reruns_only_the_missing_cells           |
| MLflow server unreachable during a sweep | test_mlflow_outage_during_a_sweep_is_backfilled_by_sync      |
| ... during a nightly                     | test_mlflow_outage_during_a_nightly_fails_it_and_names_...   |
| truncated checkpoint or Parquet file     | test_truncated_*                                             |
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline import cli, results
from sors import config as config_lib
from sors import train as train_lib

pytestmark = pytest.mark.timeout(400)
REPO = Path(__file__).resolve().parent.parent
TINY = {"data.name": "fashion_mnist", "data.n_test": 64, "train.optimizer": "adam", "train.lr": 0.002,
        "train.batch_size": 32, "train.use_gpu": False}


# ---------------------------------------------------------------- helpers

def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition()`` until it returns something truthy (returned) or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def is_ray_worker(pid: int) -> bool:
    """True when ``pid`` is alive and is a Ray worker process (never signal a recycled pid)."""
    try:
        return "ray::" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def registered_epoch(run_dir: Path) -> int:
    """The epoch of the checkpoint Ray Train has registered for a run (0 if none yet)."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
        return int(latest["checkpoint_dir_name"].split("_")[1]) if latest else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def make_epoch_recorder(path: str):
    """An epoch hook (runs in the Ray Train worker) appending ``epoch pid`` lines to ``path``.
    A closure, so Ray pickles it by value and workers need not import this test module."""
    def record(epoch: int, row: dict) -> None:
        with open(path, "a") as handle:
            handle.write(f"{epoch} {os.getpid()}\n")
    return record


def zombie_actors(ray) -> list[str]:
    """``class (job)`` of every non-detached actor still alive although its job is dead: Ray force-kills a
    killed driver's actors only after a 30 s grace period, and until then they can still reserve resources."""
    dead = {j["JobID"] for j in ray._private.state.jobs() if j["IsDead"]}
    return [f"{a['ActorClassName']} ({a['JobID']})" for a in ray._private.state.actors().values()
            if a["State"] != "DEAD" and a["JobID"] in dead and not a["IsDetached"]]


def wait_for_dead_jobs(ray, timeout: float = 120) -> None:
    """After SIGKILLing a driver: wait until Ray has marked its job dead and killed its actors (a placement
    group one of them reserved in the meantime is the resumed run's to reclaim: pipeline.cluster)."""
    me = ray.get_runtime_context().get_job_id()

    def cleaned_up():
        return all(j["IsDead"] for j in ray._private.state.jobs() if j["JobID"] != me) and not zombie_actors(ray)
    try:
        wait_for(cleaned_up, timeout, "Ray to clean up the killed driver's job", interval=0.5)
    except AssertionError as err:
        raise AssertionError(f"{err}: still alive: {zombie_actors(ray)}") from None


def spawn_driver(argv: list[str], cwd: Path) -> subprocess.Popen:
    """``sors ...`` as a separate driver process in its own session (so it can be killed alone)."""
    log = open(cwd / "driver.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver process group this test started (a preempted node does no cleanup either)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_driver(argv: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``sors ...`` to completion as a separate driver; returns (exit code, its output). A driver still
    running after ``timeout`` s is killed and the test fails naming where it hung -- in a separate process,
    a hang cannot take the test session's own Ray connection down with it."""
    proc = spawn_driver(argv, cwd)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_driver(proc)
        raise AssertionError(f"sors {argv[0]} still running after {timeout:.0f} s:\n"
                             + (cwd / "driver.log").read_text(errors="replace")[-3000:]) from None
    return proc.returncode, (cwd / "driver.log").read_text(errors="replace")


def write_preset(path: Path, name: str, trials: list[dict], attacks=("fgsm",)) -> Path:
    """A smoke-sized preset file (tiny subsets; clean + the given attacks at 50/255)."""
    import yaml

    base = dict(TINY, **{"data.n_train": 256, "train.epochs": 1, "eval.n_examples": 32, "eval.repeats": 1, "eval.all_paths": 2,
                         "eval.batch_size": 32})
    path.write_text(yaml.safe_dump({"name": name, "description": "fault-injection test", "base": base,
                                    "trials": trials, "evaluation": {"clean": True,
                                                                     "attacks": [{"name": a} for a in attacks],
                                                                     "eps": ["50/255"], "seeds": [0]}}))
    return path


def store_rows(results_dir: Path) -> list[dict]:
    return results.read_rows(results_dir / "cells")


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of the MLflow server: ``down()`` cuts every connection and
    refuses new ones (the server "goes away"), ``up()`` listens again on the same port."""

    def __init__(self, target_uri: str):
        host, port = target_uri.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listening = False
        self.up()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.settimeout(0.1)
        self._listening = True
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        self._listening = False
        time.sleep(0.3)  # the accept loop notices and closes the listening socket
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def down_when(self, condition, what: str) -> threading.Thread:
        """Go down once ``condition()`` holds (polled for up to 240 s), from a watcher thread (returned)."""
        def watch():
            wait_for(condition, 240, what)
            self.down()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        return watcher

    def _accept(self, server: socket.socket) -> None:
        with server:
            while self._listening:
                try:
                    client, _ = server.accept()
                except socket.timeout:
                    continue
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    self._open.update((client, upstream))
                for src, dst in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A LeNet-5 checkpoint trained in-process (no Ray) on 256 real Fashion-MNIST images."""
    cfg = config_lib.resolve(config_lib.apply_overrides(config_lib.RunConfig(), dict(
        TINY, **{"model.name": "lenet5", "data.n_train": 256, "train.epochs": 1})))
    state = train_lib.fit(cfg)
    return train_lib.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lenet.pt", state, cfg)


# ---------------------------------------------------------------- 1. Ray Train worker killed mid-epoch

@pytest.mark.fault
@pytest.mark.ray
def test_a_killed_train_worker_resumes_from_its_last_checkpoint(ray_session, tmp_path):
    from pipeline import trainer

    epochs = 4
    cfg = config_lib.resolve(config_lib.apply_overrides(config_lib.RunConfig(), dict(
        TINY, **{"model.name": "sors_lenet5", "data.n_train": 1024, "train.epochs": epochs})))
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
    outcome = trainer.fit(cfg, name, str(storage), epoch_hook=make_epoch_recorder(str(log)), max_failures=1)
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

    from pipeline.records import load_record, record_path

    # One trial's Ray Train run takes every CPU, so Tune runs the two trials one after the other: the
    # driver is killed once one trial is finished (trained, evaluated, tracked) and the other has started.
    workers = int(ray_session.cluster_resources()["CPU"])
    preset = write_preset(tmp_path / "two.yaml", "drvkill", [
        {"name": "wide", "label": "LeNet-5 (DP)", "set": {"model.name": "lenet5", "train.num_workers": workers}},
        {"name": "long", "label": "LeNet-5 (2 ep)", "set": {"model.name": "lenet5", "train.epochs": 2,
                                                           "train.seed": 1}}], attacks=())
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
    assert [m.step for m in client.get_metric_history(done_run, "loss")] == list(range(1, json.loads(done_record)
                                                                                        ["epochs"] + 1))

    # the unfinished trial finished, once, with its full epoch count, and is tracked
    record = load_record(str(results_dir), "drvkill", unfinished)
    assert record["evaluated"] and record["tracking"]["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == list(range(1, record["epochs"] + 1))
    runs = client.search_runs([client.get_run(done_run).info.experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("long", "FINISHED"), ("wide", "FINISHED")]


# ---------------------------------------------------------------- 3. evaluation fan-out killed mid-way

@pytest.mark.fault
@pytest.mark.ray
def test_a_killed_fanout_reruns_only_the_missing_cells(ray_session, mlflow_server, tiny_checkpoint, tmp_path, capsys):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    results_dir = tmp_path / "results"
    args = ["evaluate", str(tiny_checkpoint), "--results-dir", str(results_dir), "--tracking-uri", mlflow_server,
            "--name", "fanout-kill", "--no-progress", "--set", "eval.n_examples=64", "--set", "eval.repeats=1"]
    total = 13  # clean + (fgsm, pgd, mim) x 4 eps, the default plan for Fashion-MNIST
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
    assert duckdb.sql(f"select count(*) from read_parquet('{cells}/**/*.parquet', hive_partitioning=true)"
                      ).fetchall()[0][0] == total
    assert not [p for p in cells.rglob("*") if p.is_file() and p.suffix != ".parquet" and not p.name.startswith(".")]


# ---------------------------------------------------------------- 4. MLflow unreachable during a sweep

@pytest.mark.fault
@pytest.mark.ray
def test_mlflow_outage_during_a_sweep_is_backfilled_by_sync(ray_session, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.records import load_record

    preset = write_preset(tmp_path / "one.yaml", "outage",
                          [{"name": "lenet5", "label": "LeNet-5", "set": {"model.name": "lenet5", "train.epochs": 1}}])
    results_dir = tmp_path / "results"
    proxy = TcpProxy(mlflow_server)

    # the server goes away once the trial has started training (after the run was created)
    watcher = proxy.down_when(lambda: any(p.name.startswith("outage.") for p in (results_dir / "ray").glob("*")),
                              "the trial to start training")
    code = cli.main(["sweep", str(preset), "--results-dir", str(results_dir), "--tracking-uri", proxy.uri,
                     "--no-progress"])
    out, err = capsys.readouterr()
    watcher.join(timeout=5)

    # the work is done and on disk; the CLI says clearly that tracking failed and how to fix it
    assert code == 1, err
    message = [line for line in err.splitlines() if line.startswith("sors sweep: tracking failed")]
    assert len(message) == 1 and "sors sync outage" in message[0] and "checkpoints and Parquet" in message[0]
    record = load_record(str(results_dir), "outage", "lenet5")
    assert record["evaluated"] and record["tracking"]["status"] == "incomplete"
    assert train_lib.read_checkpoint(record["checkpoint_uri"])["epoch"] == 1
    rows = store_rows(results_dir)
    assert len(rows) == 2
    trial_files = list((results_dir / "ray").rglob("params.*"))
    assert trial_files and not any(proxy.uri.encode() in f.read_bytes() for f in trial_files)  # the URI may hold a password

    proxy.up()
    assert cli.main(["sync", "--results-dir", str(results_dir), "--tracking-uri", proxy.uri]) == 0
    assert "1 of 1 run(s) up to date" in capsys.readouterr().out

    client = MlflowClient(mlflow_server)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert set(config_lib.flat_dict(config_lib.from_dict(record["config"]))) <= set(run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    for row in rows:
        key = "clean_eval" if row["attack"] == "none" else f"{row['attack']}_eps{row['eps']:.3f}"
        assert run.data.metrics[f"{key}_acc"] == pytest.approx(row["accuracy"])
    assert {"cells", "checkpoint", "report"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.outputs.model_outputs  # mlflow.pytorch.log_model
    assert {r["mlflow_run_id"] for r in store_rows(results_dir)} == {run.info.run_id}
    assert load_record(str(results_dir), "outage", "lenet5")["tracking"]["status"] == "complete"

    # idempotent: a second sync finds nothing to log
    assert cli.main(["sync", "--all", "--results-dir", str(results_dir), "--tracking-uri", proxy.uri]) == 0
    assert "logged 0 metric(s), 0 artifact(s)" in capsys.readouterr().out
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]


@pytest.mark.fault
@pytest.mark.ray
def test_mlflow_outage_during_a_nightly_fails_it_and_names_the_sync_command(ray_session, mlflow_server, tmp_path,
                                                                             capsys):
    import yaml

    from pipeline import nightly

    config = write_preset(tmp_path / "night.yaml", "night",
                          [{"name": "lenet5", "label": "LeNet-5", "set": {"model.name": "lenet5"}}])
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "nightly": {"min_drop": 2.0}}))
    results_dir = tmp_path / "results"
    proxy = TcpProxy(mlflow_server)

    # MLflow goes away once the trial trains: the night's models and cells finish untracked
    watcher = proxy.down_when(lambda: any("lenet5" in p.name for p in results_dir.glob("nightly/night/runs/*/*/ray/*")),
                              "the nightly's trial to start training")
    code = nightly.main(["--config", str(config), "--results-dir", str(results_dir), "--tracking-uri", proxy.uri,
                         "--no-progress"])
    out, err = capsys.readouterr()
    watcher.join(timeout=5)
    proxy.up()

    assert code == 1, out + err  # no regression (a first run accepts itself), but the MLflow record is partial
    assert out.strip().splitlines()[-1].startswith("sors nightly: exit 1: TRACKING INCOMPLETE: 1 run(s)")
    message = [line for line in err.splitlines() if line.startswith("sors nightly: tracking failed")]
    assert len(message) == 1 and "sors sync" in message[0]
    run_json = next(results_dir.glob("nightly/night/runs/*/*/run.json"))
    run = json.loads(run_json.read_text())
    assert (run["status"], run["exit_code"], run["summary"]["tracking_missed"]) == ("tracking-incomplete", 1, 1)
    # the advice works: the sync it names backfills the night's model run from the run folder
    assert cli.main(["sync", "--results-dir", str(run_json.parent), "--tracking-uri", proxy.uri]) == 0
    assert "1 of 1 run(s) up to date" in capsys.readouterr().out


# ---------------------------------------------------------------- 5. truncated checkpoint or Parquet file

@pytest.fixture
def stored_results(tmp_path, tiny_checkpoint):
    """A results folder as a finished `sors sweep smoke` leaves it for trial lenet5, built without Ray:
    its checkpoint, model record and two evaluated cells (clean, FGSM) in the Parquet store."""
    from pipeline import presets
    from pipeline.records import save_record
    from pipeline.sweep import cell_specs
    from tasks import cells, storage

    results_dir = tmp_path / "results"
    ckpt = results_dir / "ray" / "smoke.lenet5" / "epoch_0001" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    trial = presets.build_sweep("smoke").trial("lenet5")
    record = {"sweep": "smoke", "trial": "lenet5", "label": trial.label, "variants": [],
              "config": config_lib.to_dict(trial.config), "config_hash": config_lib.config_hash(trial.config),
              "run_name": "smoke.lenet5", "checkpoint_uri": str(ckpt), "checkpoint_sha256": storage.file_sha256(ckpt),
              "mlflow_run_id": None, "history": [], "evaluated": True}
    save_record(str(results_dir), record)
    plan = presets.EvalPlan(clean=True, attacks=({"name": "fgsm"},), eps=(50 / 255,))
    for spec in cell_specs(trial, record, plan, "smoke")[:2]:
        _, row = cells.evaluate(spec)
        results.write_row(results_dir / "cells", row)
    return results_dir


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sors {command}: error: ") and "Traceback" not in out + err, err
    return lines[0]


@pytest.mark.fault
def test_truncated_parquet_cell_is_named_in_one_line_and_nothing_is_touched(stored_results, tmp_path, capsys):
    victim = results.files(stored_results / "cells")[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _snapshot(tmp_path)
    assert cli.main(["report", "--results-dir", str(stored_results), "--no-mlflow"]) == 2
    assert str(victim) in _one_line_error(capsys, "report")
    assert cli.main(["sweep", "smoke", "--results-dir", str(stored_results), "--no-progress"]) == 2
    line = _one_line_error(capsys, "sweep")
    assert str(victim) in line and "truncated or corrupt" in line and "delete it and rerun" in line
    assert _snapshot(tmp_path) == before  # no report, no new cell, no MLflow store, no Ray state


@pytest.mark.fault
def test_truncated_checkpoints_are_named_in_one_line_and_nothing_is_touched(stored_results, tmp_path, capsys):
    # `sors evaluate` on a truncated checkpoint
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(json.loads((stored_results / "models/smoke/lenet5.json").read_text())["checkpoint_uri"])
                    .read_bytes()[:3000])
    before = _snapshot(tmp_path)
    assert cli.main(["evaluate", str(cut), "--results-dir", str(tmp_path / "other")]) == 2
    assert f"{cut}: unreadable checkpoint (truncated or corrupt" in _one_line_error(capsys, "evaluate")
    assert _snapshot(tmp_path) == before and not (tmp_path / "other").exists()

    # a sweep whose finished trial's checkpoint was truncated after training
    record = json.loads((stored_results / "models/smoke/lenet5.json").read_text())
    ckpt = Path(record["checkpoint_uri"])
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    before = _snapshot(tmp_path)
    assert cli.main(["sweep", "smoke", "--resume", "--results-dir", str(stored_results), "--no-progress"]) == 2
    line = _one_line_error(capsys, "sweep")
    assert str(ckpt) in line and "truncated or changed" in line
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- security defaults

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_every_checkpoint_load_in_pipeline_and_tasks_goes_through_the_weights_only_reader():
    offenders = []
    for folder in ("pipeline", "tasks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("torch.load(", "pickle.load", "weights_only=False", "mlflow.pytorch.load_model",
                           "cloudpickle.load"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []  # sors.train.read_checkpoint (torch.load(weights_only=True)) is the one reader


def test_a_pickle_payload_in_a_checkpoint_is_refused_by_every_command(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "config": {}, "x": _Payload(marker)}, evil)
    assert cli.main(["evaluate", str(evil), "--results-dir", str(tmp_path / "results")]) == 2
    assert f"{evil}: refused to load" in _one_line_error(capsys, "evaluate")
    # ... as a teacher, and as the epoch checkpoint an interrupted trial would resume from
    assert cli.main(["train", "--set", f"train.teacher={evil}", "--results-dir", str(tmp_path / "results")]) == 2
    assert "refused to load" in _one_line_error(capsys, "train")
    from pipeline import presets, trainer

    trial = presets.build_sweep("smoke").trial("lenet5")
    run_dir = tmp_path / "results" / "ray" / trainer.run_name("smoke", "lenet5", trial.config)
    (run_dir / "epoch_0001").mkdir(parents=True)
    (run_dir / "epoch_0001" / "model.pt").write_bytes(evil.read_bytes())
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "epoch_0001"}}))
    assert cli.main(["sweep", "smoke", "--resume", "--results-dir", str(tmp_path / "results")]) == 2
    assert "refused to load" in _one_line_error(capsys, "sweep")
    assert not marker.exists()  # the payload never ran


def test_no_secret_reaches_mlflow_params_or_the_console(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "secrets", str(tmp_path / "art"))
    params = {"train.teacher": "https://bucket.s3.amazonaws.com/t.pt?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA9",
              "data.root": "s3://alice:hunter2@storage.internal/data", "train.lambda": 10.0}
    run_id = tracking.find_or_create_run(uri, experiment, "t", "hash", params, {"note": "token=abc123"})
    run = MlflowClient(uri).get_run(run_id)
    stored = json.dumps({**run.data.params, **run.data.tags})
    for secret in ("s3cr3t", "AKIA9", "hunter2", "abc123"):
        assert secret not in stored
    assert run.data.params["data.root"] == "s3://alice:***@storage.internal/data"  # still says where

    # the console: a password in the tracking URI is never printed, in errors or in normal output
    assert cli.main(["sweep", "smoke", "--dry-run", "--tracking-uri", "http://bob:pa55word@127.0.0.1:1",
                     "--results-dir", str(tmp_path / "r")]) == 2
    out, err = capsys.readouterr()
    assert "pa55word" not in out + err and "bob:***@" in err


@pytest.mark.ray
def test_the_local_ray_starts_no_dashboard(ray_session):
    node = ray_session._private.worker.global_worker.node
    assert not node.address_info.get("webui_url")  # include_dashboard=False: nothing listens on 8265


@pytest.mark.ray
def test_reclaiming_orphaned_placement_groups_leaves_live_jobs_reservations_alone(ray_session):
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from pipeline import cluster

    mine = placement_group([{"CPU": 1}])
    assert mine.wait(60)
    try:
        # this job is alive, so its reservation is not an orphan (whatever earlier tests' killed drivers left)
        assert mine.id.binary() not in {pg.placement_group_id for pg in cluster.orphaned_placement_groups()}
        assert mine.id.binary() not in {pg.placement_group_id for pg in cluster.reclaim_orphaned_placement_groups()}
        assert placement_group_table(mine)["state"] == "CREATED"
    finally:
        remove_placement_group(mine)


@pytest.mark.ray
def test_a_sweep_says_when_other_jobs_hold_the_cpus_its_training_needs(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline import cluster

    total = int(ray_session.cluster_resources()["CPU"])
    # what earlier tests reserved is counted as free again within moments (Ray's resource view lags)
    wait_for(lambda: cluster.shortage(total, use_gpu=False) is None, 30, "every CPU to be free")
    held = placement_group([{"CPU": 1}])
    assert held.wait(60)
    try:
        message = wait_for(lambda: cluster.shortage(total, use_gpu=False), 10, "Ray to count the reserved CPU")
        assert f"only {total - 1} of the cluster's {total} CPUs are free and a training run needs {total}" in message
    finally:
        remove_placement_group(held)
    wait_for(lambda: cluster.shortage(total, use_gpu=False) is None, 10, "Ray to count the CPU as free again")
