"""Hostile input that reaches Ray: what a local Ray exposes on the network, what its worker logs
keep, how an error raised in a task reaches the user, and a training run that diverges. Real local
Ray (the session's, started by ``pipeline.cluster.connection.connect`` as ``sors`` starts it) and a real
``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.cliutil import original_error
from pipeline.redact import redact
from sors.errors import ConfigError

SECRET = "s3cr@t-Pa55"  # holds a raw "@": the whole password must go, not the part after the "@"


# ---------------------------------------------------------------- sockets


def _process_tree(root: int) -> list[int]:
    """``root`` and every descendant, from /proc (Ray's GCS, raylet, agents and workers are children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _listening_addresses(pids: list[int]) -> list[tuple[str, str, int]]:
    """``(process name, address, port)`` of every TCP socket in LISTEN state (and bound UDP socket) the
    processes hold, read from /proc/<pid>/fd and /proc/net/{tcp,tcp6,udp,udp6}."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, family in (
        ("tcp", socket.AF_INET),
        ("tcp6", socket.AF_INET6),
        ("udp", socket.AF_INET),
        ("udp6", socket.AF_INET6),
    ):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in owner or (table.startswith("tcp") and state != "0A"):
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            raw = raw[::-1] if family == socket.AF_INET else b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
            name = Path(f"/proc/{owner[inode]}/comm").read_text().strip()
            found.append((name, socket.inet_ntop(family, raw), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc socket tables")
def test_a_local_ray_listens_on_loopback_only(ray_session):
    """GCS, raylet, runtime-env agent, driver and workers: nothing bound to a routable address."""

    @ray_session.remote
    def pid() -> int:
        return os.getpid()

    ray_session.get([pid.remote() for _ in range(2)])  # workers up
    sockets = _listening_addresses(_process_tree(os.getpid()))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the test sees Ray's own servers
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


# ---------------------------------------------------------------- errors across Ray


def test_a_config_error_raised_in_a_ray_task_reaches_the_driver_as_itself(ray_session):
    @ray_session.remote(max_retries=0)
    def bad_member():
        raise ConfigError("model.members", "unknown member model 'nope'", "lenet5, resnet18")

    with pytest.raises(Exception) as caught:
        ray_session.get(bad_member.remote())
    original = original_error(caught.value)
    assert type(original) is ConfigError  # not "ConfigError.__init__() missing ... 'problem'"
    assert str(original) == "model.members: unknown member model 'nope'; allowed: lenet5, resnet18"


# ---------------------------------------------------------------- secrets in worker logs


def _worker_logs() -> str:
    import ray

    folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "\n".join(p.read_text(errors="replace") for p in folder.glob("worker-*"))


def test_mlflow_view_run_lines_and_log_records_in_ray_workers_are_redacted(ray_session, mlflow_server):
    """MLflow prints "View run ... at: <tracking URI>" with sys.stdout.write inside a trial; Ray keeps a
    worker's stdout and stderr in files under the session folder, readable by every local user."""
    uri = mlflow_server.replace("http://", f"http://sors:{SECRET}@")

    @ray_session.remote(max_retries=0)
    def log_a_run(tracking_uri: str) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.create_experiment(f"redaction-{os.getpid()}-{time.time_ns()}")
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id)  # prints the "View run" line
        logging.getLogger("mlflow.tracking").warning("could not reach %s", tracking_uri)
        print(f"connecting to {tracking_uri}", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        return run.info.run_id

    run_id = ray_session.get(log_a_run.remote(uri))
    deadline = time.time() + 20
    while run_id not in _worker_logs() and time.time() < deadline:
        time.sleep(0.5)  # Ray's log files are written by the worker; give them a moment
    logs = _worker_logs()
    assert "View run" in logs and run_id in logs  # the line is there ...
    assert "sors:***@127.0.0.1" in logs  # ... with the password masked
    assert SECRET not in logs and SECRET.split("@")[1] not in logs


@pytest.mark.parametrize(
    "text",
    [
        f"http://sors:{SECRET}@mlflow:5000/#/experiments/1",
        f"postgresql://u:{SECRET}@db/mlflow",
        f"🏃 View run x at: https://a:{SECRET}@h/",
    ],
)
def test_passwords_with_reserved_characters_are_masked_whole(text):
    masked = redact(text)
    assert SECRET not in masked and SECRET.split("@")[1] not in masked and ":***@" in masked


# ---------------------------------------------------------------- divergence


def test_a_diverging_training_run_stops_with_exit_1_and_keeps_no_model(ray_session, tmp_path, capsys, monkeypatch):
    """SGD at the highest learning rate the config accepts blows up within one epoch: the run stops with
    one line, exit 1, no model record (so nothing downstream uses the weights), its MLflow run FAILED."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "results"
    code = cli.main(
        [
            "train",
            "--set",
            "model.name=lenet5",
            "--set",
            "train.lr=10",
            "--set",
            "data.n_train=2000",
            "--set",
            "data.n_test=100",
            "--results-dir",
            str(results),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sors train")]
    assert code == 1, err
    assert len(lines) == 1 and "training diverged: loss nan" in lines[0] and "Traceback" not in err
    assert not list(results.glob("models/**/*.json"))  # no model record: nothing downstream uses the weights
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and all(r.info.status == "FAILED" for r in runs)
