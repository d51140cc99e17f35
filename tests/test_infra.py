"""Deployment files under infra/: every YAML parses and carries what its tool needs, the pieces refer to
each other by the right names, and the shell entry points behave (cron lock, exit codes, log rotation,
the Kubernetes nightly's exit code, the MLflow server command)."""

from __future__ import annotations

import copy
import fcntl
import gzip
import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
WRAPPER = INFRA / "cron" / "sors-nightly.sh"
SERVE = INFRA / "mlflow" / "serve.sh"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_objects() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_objects() if d["kind"] == kind]


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec inside a Kubernetes object (Deployment, CronJob, RayCluster head and workers)."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


# ---------------------------------------------------------------- YAML under infra/


def test_every_yaml_under_infra_parses_to_a_mapping():
    files = yaml_files()
    assert len(files) >= 8, files  # k8s objects, the launcher config, the nightly configs
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_kubernetes_objects_have_api_version_kind_and_name():
    objects = k8s_objects()
    kinds = {d["kind"] for d in objects}
    assert {
        "RayCluster",
        "RayJob",
        "CronJob",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Kustomization",
    } <= kinds
    for obj in objects:
        assert re.match(r"^[a-z0-9.-]*/?v\d\w*$", obj["apiVersion"]), obj["apiVersion"]
        if obj["kind"] != "Kustomization":
            assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", obj["metadata"]["name"]), obj["metadata"]
    for obj in objects:
        if obj["kind"] in ("RayCluster", "RayJob"):
            assert obj["apiVersion"] == "ray.io/v1"


def test_raycluster_has_a_cpu_head_and_autoscaled_gpu_workers():
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # nothing exposed outside the cluster
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "no worker group asks for a GPU"
    assert all(g["maxReplicas"] >= g["minReplicas"] >= 0 for g in gpu_groups)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"].count(".") == 2


def test_nightly_cronjob_runs_at_0200_utc_without_overlap_or_retries():
    (cron,) = by_kind("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields)
    assert fields[:2] == ["0", "2"] and fields[2:] == ["*", "*", "*"]
    assert spec["timeZone"] in ("Etc/UTC", "UTC")
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0
    script = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "sors submit --address" in script and "sors nightly --config" in script


def test_rayjob_runs_a_sweep_on_the_raycluster():
    (job,) = by_kind("RayJob")
    (cluster,) = by_kind("RayCluster")
    assert job["spec"]["entrypoint"].split()[:2] == ["sors", "sweep"]
    assert "--ray-address auto" in job["spec"]["entrypoint"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def test_kubernetes_objects_refer_to_each_other_by_existing_names():
    (cluster,) = by_kind("RayCluster")
    head_service = f"{cluster['metadata']['name']}-head-svc"  # the Service KubeRay creates for the head
    services = {s["metadata"]["name"] for s in by_kind("Service")}
    claims = {c["metadata"]["name"] for c in by_kind("PersistentVolumeClaim")}
    (kustomization,) = by_kind("Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    image_names = {i["name"] for i in kustomization["images"]}
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    for host, _port in set(re.findall(r"http://([a-z0-9-]+):(\d+)", text)):
        assert host in services | {head_service}, f"{host} is not a Service here"
    for obj in k8s_objects():
        for pod in pod_specs(obj):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
            mounted = {v["name"] for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                assert container["image"].split(":")[0] in image_names, container["image"]
                assert {m["name"] for m in container.get("volumeMounts", [])} <= mounted


def _cronjob_script() -> str:
    (cron,) = by_kind("CronJob")
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]


@pytest.mark.parametrize(
    "printed, status, expected",
    [
        ("sors nightly: exit 0: no regression", 0, 0),
        ("sors nightly: exit 1: regression in 2 of 6 cells", 1, 1),
        ("sors nightly: exit 2: could not run: data not found", 2, 2),
        ("sors submit: job sors-nightly-x STOPPED, exit 130", 130, 2),
        ("sors nightly: exit 0: no regression (a stale line: the code of the job says otherwise)", 1, 1),
    ],
)
def test_kubernetes_nightly_pod_exits_with_the_nightlys_own_code(tmp_path, printed, status, expected):
    """The pod exits with the code `sors submit` read from the Jobs API (the driver's), never from log lines."""
    fake = tmp_path / "bin" / "sors"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = submit ] || exit 99\necho '{printed}'\nexit {status}\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", _cronjob_script()], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == expected, done.stdout + done.stderr


# ---------------------------------------------------------------- Ray cluster launcher


def test_ray_cluster_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in raw, key
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's own JSON schema, as `ray up` applies it
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in workers)
    assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0

    broken = copy.deepcopy(raw)
    broken["available_node_types"][raw["head_node_type"]]["gpus"] = 1  # a typo Ray must reject
    with pytest.raises(Exception, match="gpus"):
        validate_config(prepare_config(broken))


def test_ray_cluster_installs_the_project_on_every_node_and_keeps_the_dashboard_local():
    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    remote = next(r for r, local in raw["file_mounts"].items() if local == ".")
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the shared token, on every node
    setup = " ".join(raw["setup_commands"])  # setup_commands run on head and workers alike
    assert f"-e {remote}" in setup and "ray[" in setup
    assert "dataset-fashion-mnist" in setup
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for start in (head_start, " ".join(raw["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in start


def test_kuberay_pods_and_the_nightly_submitter_use_ray_token_authentication():
    (cluster,) = by_kind("RayCluster")
    (cron,) = by_kind("CronJob")
    containers = [c for obj in (cluster, cron) for pod in pod_specs(obj) for c in pod["containers"]]
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "sors-ray-auth", "key": "auth_token"}
    for container in (c for obj in (cluster,) for pod in pod_specs(obj) for c in pod["containers"]):
        assert {e["name"]: e.get("value") for e in container["env"]}["RAY_AUTH_MODE"] == "token"
    head = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert "sors_driver" in head["resources"]  # trial drivers' resource: only the CPU head has it


# ---------------------------------------------------------------- cron


def test_crontab_line_runs_the_wrapper_daily_at_0200_utc():
    lines = [l for l in (INFRA / "cron" / "crontab").read_text().splitlines() if l.strip() and not l.startswith("#")]
    env = dict(l.split("=", 1) for l in lines if re.match(r"^[A-Z_]+=", l))
    jobs = [l for l in lines if not re.match(r"^[A-Z_]+=", l)]
    assert env["CRON_TZ"] == "UTC"
    (job,) = jobs
    minute, hour, dom, month, dow, command = job.split(None, 5)
    assert (minute, hour, dom, month, dow) == ("0", "2", "*", "*", "*")
    assert "infra/cron/sors-nightly.sh" in command and "$SORS_HOME" in command


def _fake_sors(tmp_path: Path, body: str) -> Path:
    fake = tmp_path / "fake-sors"
    fake.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    fake.chmod(0o755)
    return fake


def _run_wrapper(tmp_path: Path, fake: Path, *args: str, keep: int = 30, timeout: float = 30):
    env = dict(
        os.environ,
        SORS_BIN=str(fake),
        SORS_RESULTS_DIR=str(tmp_path / "results"),
        SORS_NIGHTLY_KEEP_LOGS=str(keep),
        MARKER=str(tmp_path / "ran"),
    )
    return subprocess.run(["bash", str(WRAPPER), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cron_wrapper_refuses_to_start_while_another_nightly_holds_the_lock(tmp_path):
    fake = _fake_sors(tmp_path, 'echo "$@" > "$MARKER"\n')
    lock = tmp_path / "results" / "nightly" / "nightly.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another nightly is running
        held.write("4242\n")
        held.flush()
        refused = _run_wrapper(tmp_path, fake)
        assert refused.returncode == 2
        assert "another nightly holds" in refused.stderr and "4242" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "ran").exists(), "the nightly ran despite the lock"
        assert lock.read_text().strip() == "4242", "the refused start clobbered the holder's pid"
    started = _run_wrapper(tmp_path, fake)  # lock released: it runs
    assert started.returncode == 0, started.stderr
    assert (tmp_path / "ran").read_text().split()[:2] == ["nightly", "--results-dir"]


def test_cron_wrapper_keeps_the_exit_code_and_rotates_logs(tmp_path):
    fake = _fake_sors(tmp_path, 'echo "report line for $*"\nexit "${FAKE_RC:-0}"\n')
    logs = tmp_path / "results" / "nightly" / "logs"
    logs.mkdir(parents=True)
    for day in range(1, 5):  # four older nightlies' logs
        (logs / f"nightly-2020010{day}T020000Z-1.log").write_text(f"old {day}\n")
    os.environ["FAKE_RC"] = "1"
    try:
        done = _run_wrapper(tmp_path, fake, "--config", "x.yaml", keep=3)
    finally:
        del os.environ["FAKE_RC"]
    assert done.returncode == 1
    assert "exit 1 (robustness regression)" in done.stderr
    assert (tmp_path / "results" / "nightly" / "last-exit-code").read_text().strip() == "1"
    names = sorted(p.name for p in logs.iterdir())
    assert len([n for n in names if n.startswith("nightly-")]) == 3  # newest three kept
    latest = (logs / "latest.log").resolve()
    assert latest.suffix == ".log" and "report line for nightly --results-dir" in latest.read_text()
    assert latest.read_text().count("--config x.yaml") == 2  # the command line and the fake's echo
    assert "with exit code 1" in latest.read_text()
    older = sorted(n for n in names if n.endswith(".gz"))
    assert older == ["nightly-20200103T020000Z-1.log.gz", "nightly-20200104T020000Z-1.log.gz"]
    assert gzip.decompress((logs / older[-1]).read_bytes()) == b"old 4\n"


def test_cron_wrapper_lock_does_not_outlive_it_through_leftover_children(tmp_path):
    """Ray may leave daemons running after the nightly exits; they must not keep the lock."""
    fake = _fake_sors(tmp_path, 'sleep 60 >/dev/null 2>&1 &\necho $! > "$MARKER.child"\nexit 0\n')
    first = _run_wrapper(tmp_path, fake)
    child = int((tmp_path / "ran.child").read_text())
    try:
        assert first.returncode == 0, first.stderr
        second = _run_wrapper(tmp_path, fake)
        assert second.returncode == 0, second.stderr
    finally:
        os.kill(child, signal.SIGTERM)
        try:
            second_child = int((tmp_path / "ran.child").read_text())
            if second_child != child:
                os.kill(second_child, signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def test_cron_wrapper_counts_an_unexpected_crash_as_could_not_run(tmp_path):
    fake = _fake_sors(tmp_path, "kill -SEGV $$\n")
    done = _run_wrapper(tmp_path, fake)
    assert done.returncode == 2
    assert "could not run" in done.stderr


# ---------------------------------------------------------------- MLflow server script


def _serve(*args: str, **env: str):
    return subprocess.run(
        ["bash", str(SERVE), *args], env=dict(os.environ, **env), capture_output=True, text=True, timeout=30
    )


def test_mlflow_server_defaults_to_sqlite_on_loopback(tmp_path):
    done = _serve("--print", "--home", str(tmp_path / "m"))
    assert done.returncode == 0, done.stderr
    command = done.stdout.split()
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/m/mlflow.db"
    assert command[command.index("--artifacts-destination") + 1] == f"{tmp_path}/m/artifacts"
    assert "--serve-artifacts" in command
    assert not (tmp_path / "m").exists(), "--print must not create anything"


def test_mlflow_server_postgres_backend_takes_its_uri_from_the_environment(tmp_path):
    missing = _serve("--backend", "postgres", "--print", "--home", str(tmp_path), MLFLOW_BACKEND_STORE_URI="")
    assert missing.returncode == 2 and "MLFLOW_BACKEND_STORE_URI" in missing.stderr
    done = _serve(
        "--backend",
        "postgres",
        "--print",
        "--host",
        "0.0.0.0",
        "--artifacts",
        "s3://bucket/mlflow",
        MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:hunter2@db.internal:5432/mlflow",
    )
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout and "postgresql://mlflow:***@db.internal:5432/mlflow" in done.stdout
    assert "password" in done.stderr  # warned to use PGPASSWORD / ~/.pgpass instead
    assert "--artifacts-destination s3://bucket/mlflow" in done.stdout


@pytest.mark.parametrize("args", [["--port", "http"], ["--backend", "mysql"], ["--bogus"]])
def test_mlflow_server_rejects_bad_options_with_one_line(args):
    done = _serve(*args, "--print")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("mlflow-serve:")


# ---------------------------------------------------------------- nightly configs


@pytest.mark.parametrize("path", sorted((INFRA / "nightly").glob("*.yaml")), ids=lambda p: p.name)
def test_nightly_configs_resolve_with_the_nightly_loader(path):
    from pipeline import nightly

    cfg = nightly.load_config(path)
    assert cfg.name == path.stem and cfg.sweep.name == f"nightly-{path.stem}"
    assert cfg.sweep.trials and cfg.sweep.evaluation.clean
    assert cfg.settings.baseline == nightly.LAST_ACCEPTED and cfg.settings.min_drop == 2.0
    assert any(t.config.model.name.startswith("sors_") for t in cfg.sweep.trials)
