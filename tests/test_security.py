"""Security defaults: checkpoints load weights-only everywhere, no secret reaches MLflow or the
console, the local Ray starts no dashboard; and the cluster helpers (placement-group reclaim,
resource-shortage warning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import cli
from tests.faults import REPO, wait_for

pytestmark = pytest.mark.timeout(400)


# ---------------------------------------------------------------- security defaults
def test_every_checkpoint_load_in_pipeline_and_tasks_goes_through_the_weights_only_reader():
    offenders = []
    for folder in ("pipeline", "tasks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for needle in (
                "torch.load(",
                "pickle.load",
                "weights_only=False",
                "mlflow.pytorch.load_model",
                "cloudpickle.load",
            ):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []  # sors.train.read_checkpoint (torch.load(weights_only=True)) is the one reader


def test_no_secret_reaches_mlflow_params_or_the_console(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "secrets", str(tmp_path / "art"))
    params = {
        "train.teacher": "https://bucket.s3.amazonaws.com/t.pt?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA9",
        "data.root": "s3://alice:hunter2@storage.internal/data",
        "train.lambda": 10.0,
    }
    run_id = tracking.find_or_create_run(uri, experiment, "t", "hash", params, {"note": "token=abc123"})
    run = MlflowClient(uri).get_run(run_id)
    stored = json.dumps({**run.data.params, **run.data.tags})
    for secret in ("s3cr3t", "AKIA9", "hunter2", "abc123"):
        assert secret not in stored
    assert run.data.params["data.root"] == "s3://alice:***@storage.internal/data"  # still says where

    # the console: a password in the tracking URI is never printed, in errors or in normal output
    assert (
        cli.main(
            [
                "sweep",
                "smoke",
                "--dry-run",
                "--tracking-uri",
                "http://bob:pa55word@127.0.0.1:1",
                "--results-dir",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    out, err = capsys.readouterr()
    assert "pa55word" not in out + err and "bob:***@" in err


PROBE_LOCAL_RAY = """
import json, ray
from pipeline.cluster import connection as cluster
cluster.connect(num_cpus=1, object_store_memory=80 * 1024 * 1024, quiet=True)
info = ray._private.worker.global_worker.node.address_info
print(json.dumps({"webui_url": info.get("webui_url"), "node_ip_address": info.get("node_ip_address")}))
cluster.shutdown()
"""


@pytest.mark.ray
def test_the_local_ray_starts_no_dashboard():
    # in a process of its own, as `sors` starts it: the test session's Ray may have been replaced
    # by whatever an earlier test left, and ray[default] (the Jobs API) ships the dashboard
    done = subprocess.run(
        [sys.executable, "-c", PROBE_LOCAL_RAY],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert not info["webui_url"]  # include_dashboard=False: nothing listens on 8265
    assert info["node_ip_address"] == "127.0.0.1"


@pytest.mark.ray
def test_reclaiming_orphaned_placement_groups_leaves_live_jobs_reservations_alone(ray_session):
    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from pipeline.cluster import connection as cluster

    mine = placement_group([{"CPU": 1}])
    assert mine.wait(60)
    try:
        # this job is alive, so its reservation is not an orphan (whatever earlier tests' killed drivers left)
        assert mine.id.hex() not in {pg.placement_group_id for pg in cluster.orphaned_placement_groups()}
        assert mine.id.hex() not in {pg.placement_group_id for pg in cluster.reclaim_orphaned_placement_groups()}
        assert placement_group_table(mine)["state"] == "CREATED"
    finally:
        remove_placement_group(mine)


def test_an_orphan_is_an_ended_jobs_live_undetached_reservation_and_nothing_else():
    from pipeline.cluster import connection as cluster

    def group(pg_id, job, state="CREATED", detached=False):
        return {
            "placement_group_id": pg_id,
            "creator_job_id": job,
            "state": state,
            "is_detached": detached,
            "bundles": [{"unit_resources": {"CPU": 1.0}}, {"unit_resources": {"CPU": 1.0, "GPU": 1.0}}],
        }

    jobs = [
        {"job_id": "01", "status": "SUCCEEDED"},
        {"job_id": "02", "status": "RUNNING"},
        {"job_id": "03", "status": "FAILED"},
        {"job_id": None, "status": "PENDING"},
    ]
    groups = [
        group("aa", "01"),
        group("bb", "02"),
        group("cc", "01", detached=True),
        group("dd", "01", state="REMOVED"),
        group("ee", "03", state="PENDING"),
        group("ff", "99"),
    ]
    orphans = cluster.orphans_of(groups, jobs)
    # a live job's group, a detached one, a removed one and one whose creator is unknown are left alone
    assert [o.placement_group_id for o in orphans] == ["aa", "ee"]
    assert orphans[0].resources == {"CPU": 2.0, "GPU": 1.0}


@pytest.mark.ray
def test_a_sweep_says_when_other_jobs_hold_the_cpus_its_training_needs(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.cluster import connection as cluster

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
