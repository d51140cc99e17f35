"""A real two-node Ray cluster on loopback (``tests/loopback_cluster.py``): a sweep whose trials and
evaluation cells land on both nodes, with one Parquet store both nodes write; ``sors submit`` against
its Jobs API (token authentication on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.store import results
from tests.loopback_cluster import loopback_cluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Two one-worker trials (each needs the one CPU of a node: they train at once, one per node), then
# 5 cells each, which the two nodes share.
PRESET = {
    "name": "twonode",
    "description": "two LeNet-5 trials on two nodes",
    "base": {
        "data.n_train": 128,
        "data.n_test": 64,
        "train.optimizer": "adam",
        "train.lr": 0.002,
        "train.batch_size": 64,
        "train.epochs": 1,
        "model.name": "lenet5",
        "eval.n_examples": 32,
        "eval.repeats": 1,
        "eval.batch_size": 32,
    },
    "trials": [
        {"name": "a", "label": "A", "set": {"train.seed": 0}},
        {"name": "b", "label": "B", "set": {"train.seed": 1}},
    ],
    "evaluation": {
        "clean": True,
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 1}],
        "eps": ["25/255", "50/255"],
        "seeds": [0],
    },
}


@pytest.fixture(scope="module")
def cluster():
    # Ray jobs' drivers run `sors` on the head: this checkout's code, this interpreter's console scripts.
    bin_dir = str(Path(sys.executable).parent)
    with loopback_cluster(
        extra_env={
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    ) as running:
        yield running


def _node_ids(cluster) -> dict[str, str]:
    """``{node id: its custom resource}`` of the cluster's nodes."""
    probe = (
        "import json, ray\n"
        f"ray.init(address={cluster.gcs_address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps({n['NodeID']: [k for k in n['Resources'] if k.startswith('node_')][0]"
        " for n in ray.nodes() if n['Alive']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sors(cluster, *args: str, timeout: float = 540, env: dict | None = None) -> subprocess.CompletedProcess:
    """The ``sors`` CLI in its own process, as a user on the head node runs it (``env``: changes to the cluster's)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=dict(cluster.env, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


# What `sors submit` runs: the smallest sweep that trains and evaluates (the job, not the spread, is tested).
ONE_TRIAL = dict(
    PRESET,
    trials=PRESET["trials"][:1],
    evaluation=dict(PRESET["evaluation"], attacks=[{"name": "fgsm"}], eps=["25/255"]),
)


def _preset_file(tmp_path, preset: dict = PRESET) -> str:
    path = tmp_path / f"{preset['name']}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return str(path)


def test_a_sweep_spreads_trials_and_cells_over_both_nodes_into_one_store(cluster, tmp_path):
    shared = tmp_path / "shared"  # the folder both nodes see (a shared mount on a real cluster)
    done = sors(
        cluster,
        "sweep",
        _preset_file(tmp_path),
        "--ray-address",
        cluster.gcs_address,
        "--results-dir",
        str(shared),
        "--no-progress",
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    nodes = _node_ids(cluster)
    rows = results.read_rows(shared / "cells")
    assert len(rows) == 2 * 5 and {r["trial"] for r in rows} == {"a", "b"}
    assert {nodes[r["node_id"]] for r in rows} == {"node_a", "node_b"}, "cells ran on one node only"
    records = [json.loads(p.read_text()) for p in (shared / "models" / "twonode").glob("*.json")]
    assert {nodes[r["train_node_id"]] for r in records} == {"node_a", "node_b"}, "trials trained on one node only"


def test_sors_submit_runs_the_sweep_as_a_job_follows_it_and_exits_with_its_code(cluster, tmp_path):
    preset, shared = _preset_file(tmp_path, ONE_TRIAL), tmp_path / "shared"
    done = sors(
        cluster, "submit", preset, "--address", cluster.dashboard_url, "--results-dir", str(shared), "--no-progress"
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "sweep twonode:" in done.stdout  # the job's own output, followed live
    assert "SUCCEEDED, exit 0" in done.stderr
    submission_id = done.stderr.split("submitted ", 1)[1].split(":", 1)[0]
    assert submission_id.startswith("sors-twonode-")
    assert len(results.read_rows(shared / "cells")) == 2  # clean and FGSM of the one trial

    status = sors(cluster, "submit", "--status", submission_id, "--address", cluster.dashboard_url)
    assert status.returncode == 0 and "SUCCEEDED" in status.stderr
    again = sors(
        cluster,
        "submit",
        preset,
        "--address",
        cluster.dashboard_url,
        "--results-dir",
        str(shared),
        "--no-progress",
        "--no-wait",
    )  # the same sweep again: a new run of the same id, -2
    assert again.returncode == 0 and again.stdout.strip() == f"{submission_id}-2", again.stderr[-2000:]
    stop = sors(cluster, "submit", "--stop", f"{submission_id}-2", "--address", cluster.dashboard_url)
    assert stop.returncode == 0, stop.stderr[-2000:]


def test_sors_submit_exits_with_the_failed_jobs_code_and_refuses_bad_input_unsubmitted(cluster, tmp_path):
    preset = _preset_file(tmp_path, ONE_TRIAL)
    failed = sors(
        cluster,
        "submit",
        preset,
        "--address",
        cluster.dashboard_url,
        "--results-dir",
        str(tmp_path / "r"),
        "--data-root",
        str(tmp_path / "no-such-folder"),
        "--no-progress",
    )
    assert failed.returncode == 2, (failed.stdout[-2000:], failed.stderr[-3000:])  # sors sweep's code on the cluster
    assert "FAILED, exit 2" in failed.stderr

    bad = sors(cluster, "submit", preset, "--address", cluster.dashboard_url, "--set", "train.lr=-1")
    assert bad.returncode == 2 and "train.lr" in bad.stderr and "submitted" not in bad.stderr
    no_token = sors(
        cluster,
        "submit",
        "--status",
        "sors-x",
        "--address",
        cluster.dashboard_url,
        env={"RAY_AUTH_TOKEN": "", "RAY_AUTH_MODE": "disabled"},
    )
    assert no_token.returncode == 2 and len(no_token.stderr.strip().splitlines()) == 1


PROBE_RESERVATIONS = """
import json, logging, ray, sys
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.state import list_placement_groups
from pipeline.cluster import connection as cluster
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
mine = placement_group([{"node_b": 0.25}, {"node_b": 0.25}])
assert mine.wait(60)
me = ray.get_runtime_context().get_job_id()
record = [cluster.as_record(g) for g in list_placement_groups(address=sys.argv[1], detail=True)]
record = [g for g in record if g["placement_group_id"] == mine.id.hex()]
print(json.dumps({
    "orphans": [o.placement_group_id for o in cluster.orphaned_placement_groups()],
    "reclaimed": [o.placement_group_id for o in cluster.reclaim_orphaned_placement_groups()],
    "mine": mine.id.hex(),
    # the real state-API record, read as if this job had ended: what a resumed run would reclaim
    "as_ended": [vars(o) for o in cluster.orphans_of(record, [{"job_id": me, "status": "SUCCEEDED"}])],
}))
remove_placement_group(mine)
"""


def test_the_cluster_helpers_read_placement_groups_and_jobs_from_rays_state_api(cluster, ray_session):
    # ray_session: a second Ray on this machine, so the helpers must ask the cluster they are connected to
    done = subprocess.run(
        [sys.executable, "-c", PROBE_RESERVATIONS, cluster.gcs_address],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no state API" not in done.stderr  # the dashboard answered: no private GCS reads
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["mine"] not in found["orphans"] + found["reclaimed"]  # a live job's reservation stays
    assert found["as_ended"] == [{"placement_group_id": found["mine"], "resources": {"node_b": 0.5}}]
