"""Helpers of the fault-injection tests: polling, Ray worker and driver processes, tiny presets, and a
TCP proxy that takes the MLflow server away and brings it back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.store import results
from sors import config as config_lib
from sors import train as train_lib

pytestmark = pytest.mark.timeout(400)
REPO = Path(__file__).resolve().parent.parent
TINY = {
    "data.name": "fashion_mnist",
    "data.n_test": 64,
    "train.optimizer": "adam",
    "train.lr": 0.002,
    "train.batch_size": 32,
    "train.use_gpu": False,
}


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
    return [
        f"{a['ActorClassName']} ({a['JobID']})"
        for a in ray._private.state.actors().values()
        if a["State"] != "DEAD" and a["JobID"] in dead and not a["IsDetached"]
    ]


def wait_for_dead_jobs(ray, timeout: float = 120) -> None:
    """After SIGKILLing a driver: wait until Ray has marked its job dead and killed its actors (a placement
    group one of them reserved in the meantime is the resumed run's to reclaim: pipeline.cluster.connection)."""
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
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *argv],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


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
        raise AssertionError(
            f"sors {argv[0]} still running after {timeout:.0f} s:\n"
            + (cwd / "driver.log").read_text(errors="replace")[-3000:]
        ) from None
    return proc.returncode, (cwd / "driver.log").read_text(errors="replace")


def write_preset(path: Path, name: str, trials: list[dict], attacks=("fgsm",)) -> Path:
    """A smoke-sized preset file (tiny subsets; clean + the given attacks at 50/255)."""
    import yaml

    base = dict(
        TINY,
        **{
            "data.n_train": 256,
            "train.epochs": 1,
            "eval.n_examples": 32,
            "eval.repeats": 1,
            "eval.all_paths": 2,
            "eval.batch_size": 32,
        },
    )
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "description": "fault-injection test",
                "base": base,
                "trials": trials,
                "evaluation": {
                    "clean": True,
                    "attacks": [{"name": a} for a in attacks],
                    "eps": ["50/255"],
                    "seeds": [0],
                },
            }
        )
    )
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
    cfg = config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(), dict(TINY, **{"model.name": "lenet5", "data.n_train": 256, "train.epochs": 1})
        )
    )
    state = train_lib.fit(cfg)
    return train_lib.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lenet.pt", state, cfg)
