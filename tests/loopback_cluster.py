"""A real two-node Ray cluster on loopback for the tests: two ``ray start`` processes, each with one CPU,
a custom resource (``node_a`` / ``node_b``) and a small object store; stopped by process id.

Loopback: Ray turns ``--node-ip-address 127.0.0.1`` into the machine's routable address unless its
single-machine mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the switch ``pipeline.cluster.connection``
uses for a local Ray), and in that mode ``ray start --address`` refuses to add a node. The second node
is therefore started through ``ray start``'s own entry point with that refusal switched off and the
address left as given -- every process still binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# `ray start` for a second node on loopback: keep 127.0.0.1 as given and let the node join.
JOIN_ON_LOOPBACK = (
    "import sys\n"
    "from ray._private import ray_constants, services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "main()\n"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackCluster:
    gcs_address: str  # 127.0.0.1:PORT, for ray.init / --ray-address
    dashboard_url: str  # http://127.0.0.1:PORT (Jobs API)
    temp_dir: str
    env: dict = field(
        repr=False
    )  # what a driver on this machine needs in its environment (loopback mode, the auth token)
    pids: list[int] = field(default_factory=list)


def _node_args(name: str, temp_dir: str) -> list[str]:
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    return [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--resources",
        json.dumps({name: 1}),
        "--object-store-memory",
        "100000000",
        "--block",
        "--disable-usage-stats",
    ] + [str(x) for kv in ports.items() for x in kv]


def _session_pids(session: int) -> list[int]:
    """Every process of the session ``session`` (the ``ray start`` we launched and all it started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # fields after the name: state, ppid, pgrp, session, ...
            found.append(int(stat.parent.name))
    return found


def stop(pids: list[int], timeout: float = 8.0) -> None:
    """SIGTERM, then SIGKILL, every process of the sessions led by ``pids`` (a node drains for up to
    30 s on SIGTERM; a test cluster has nothing to drain)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for leader in pids:
            for pid in _session_pids(leader):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(_session_pids(p) for p in pids):
            time.sleep(0.2)
        if not any(_session_pids(p) for p in pids):
            return


def _wait_for_nodes(address: str, env: dict, count: int, timeout: float, starter: subprocess.Popen, log: Path) -> None:
    probe = (
        "import ray, sys\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(sum(1 for n in ray.nodes() if n['Alive']))\n"
    )
    deadline = time.time() + timeout
    while True:
        if starter.poll() is not None:
            raise RuntimeError(f"ray start exited with {starter.returncode}: {log.read_text()[-1500:]}")
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if time.time() > deadline:
            raise RuntimeError(
                f"the loopback cluster did not reach {count} nodes: {done.stdout[-500:]} {done.stderr[-1500:]}"
            )
        time.sleep(1.0)


@contextmanager
def loopback_cluster(timeout: float = 180.0, extra_env: dict | None = None):
    """Start the head (``node_a``, with the dashboard / Jobs API on 127.0.0.1) and a second node
    (``node_b``), their processes (and Ray jobs' drivers) with ``extra_env``; yield a
    :class:`LoopbackCluster`; stop both by process id."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray >= 2.59 turns token authentication on for `ray start --head`: every process of this cluster
    # (nodes, drivers, job clients) gets this test's own token, never the user's ~/.ray/auth_token.
    env = dict(
        os.environ, **LOOPBACK_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **(extra_env or {})
    )
    port, dashboard = free_port(), free_port()
    logs = Path(temp_dir)
    pids: list[int] = []
    try:
        head = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--head",
                "--port",
                str(port),
                "--temp-dir",
                temp_dir,
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard),
            ]
            + _node_args("node_a", temp_dir),
            env=env,
            stdout=open(logs / "head.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pids.append(head.pid)
        address = f"127.0.0.1:{port}"
        _wait_for_nodes(address, env, 1, timeout, head, logs / "head.log")
        worker = subprocess.Popen(
            [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", "--address", address] + _node_args("node_b", temp_dir),
            env=env,
            stdout=open(logs / "worker.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pids.append(worker.pid)
        _wait_for_nodes(address, env, 2, timeout, worker, logs / "worker.log")
        yield LoopbackCluster(address, f"http://127.0.0.1:{dashboard}", temp_dir, env, pids)
    finally:
        stop(pids)
