"""Connecting to Ray: a local instance sized to the machine, or an existing cluster (``auto`` / an address)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings

import ray

log = logging.getLogger("pipeline.cluster.connection")
LOOPBACK = "127.0.0.1"
# Tune's loggers that print a failed trial's whole traceback and "Trials did not complete".
QUIET_TRIAL_ERRORS = ("ray.tune.execution.tune_controller", "ray.tune.tune")
REDACT_HOOK = "pipeline.redact.install"  # worker_process_setup_hook: imported and called in every worker


def connect(
    address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None, quiet: bool = True
) -> None:
    """Initialise Ray once per process.

    ``address`` None or ``"local"``: start a local Ray with ``num_cpus`` (default: every core);
    ``"auto"`` joins the cluster this machine belongs to; anything else is passed to ``ray.init``.
    ``quiet`` keeps worker logs off the console (progress bars report instead; logs stay in /tmp/ray).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if quiet:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in QUIET_TRIAL_ERRORS:  # the CLI reports a failed trial itself, in one line (-v shows these)
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    options = {
        "log_to_driver": not quiet,
        "include_dashboard": False,
        "configure_logging": True,
        "logging_level": logging.WARNING if quiet else logging.INFO,
        # every worker process masks URI passwords in its logs and prints (Ray keeps them in files)
        "runtime_env": {"worker_process_setup_hook": REDACT_HOOK},
    }
    if address in (None, "", "local"):
        # A local machine is not a spot instance: skip Train V2's per-run preemption-watcher actor
        # (one Python process less per training run).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        with _loopback_only():
            # address="local": always a new local instance, never a `ray start` cluster someone left on this machine
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 1,
                object_store_memory=object_store_memory,
                _node_ip_address=LOOPBACK,
                **options,
            )
    else:
        ray.init(address=address, **options)
        reclaimed = reclaim_orphaned_placement_groups()
        if reclaimed:
            log.warning(
                "removed %d placement group(s) left behind by killed drivers (they held %s)",
                len(reclaimed),
                ", ".join(sorted({f"{k}={v:g}" for pg in reclaimed for k, v in pg.resources.items()})),
            )


@contextlib.contextmanager
def _loopback_only():
    """While a local Ray starts: its node address is 127.0.0.1, so the GCS, the raylet, the runtime-env
    agent, the driver's and every worker's gRPC server listen on loopback only, not on every interface.

    Why this way: ``ray.init(_node_ip_address="127.0.0.1")`` alone is turned back into the machine's
    routable address (``services.resolve_ip_for_localhost``) unless Ray is in its single-machine mode,
    which it keys on ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` -- read once at import into
    ``ray_constants.ENABLE_RAY_CLUSTER``. Both are set for the start only (child processes inherit the
    variable) and restored afterwards, so joining a cluster later in the process is unaffected.
    """
    from ray._private import ray_constants  # private, but the flag Ray itself reads

    saved_flag, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


@dataclasses.dataclass(frozen=True)
class Reservation:
    """One placement group: its id (hex) and the resources its bundles reserve, e.g. ``{"CPU": 2.0}``."""

    placement_group_id: str
    resources: dict


# Ray's terminal job states (a driver job is SUCCEEDED once it is dead, whatever killed it).
ENDED_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
STATE_API_LIMIT = 10_000  # the most entries Ray's state API returns at once


def orphans_of(groups: list[dict], jobs: list[dict]) -> list[Reservation]:
    """The placement groups of ``groups`` that still reserve resources although the job that created them
    has ended and they are not detached. ``groups``: ``ray.util.state`` placement-group records
    (``placement_group_id``, ``creator_job_id``, ``state``, ``is_detached``, ``bundles``); ``jobs``: its job
    records (``job_id``, ``status``). A creator missing from ``jobs`` counts as alive: never take a live
    job's reservation."""
    ended = {job["job_id"] for job in jobs if job.get("job_id") and _status(job) in ENDED_JOB_STATES}
    return [
        Reservation(group["placement_group_id"], _bundle_resources(group.get("bundles") or []))
        for group in groups
        if group.get("state") != "REMOVED" and not group.get("is_detached") and group.get("creator_job_id") in ended
    ]


def _status(job: dict) -> str:
    status = job.get("status")
    return str(getattr(status, "value", status))  # JobStatus is an enum of strings


def _bundle_resources(bundles: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in (bundle.get("unit_resources") or {}).items():
            total[name] = total.get(name, 0.0) + float(amount)
    return total


def orphaned_placement_groups() -> list[Reservation]:
    """:func:`orphans_of` this cluster's placement groups and jobs.

    Why: a driver SIGKILLed while a Ray Train controller is starting its worker group can leave one behind --
    the controller registers the group just after Ray has removed the dead job's groups -- and it then holds
    its CPUs/GPUs until the cluster restarts, so a resumed run waits for ever for its workers.

    The facts come from ``ray.util.state``, which asks the cluster's dashboard (every ``ray start`` head and
    KubeRay cluster runs one). A Ray started without a dashboard has no state API; there the same facts are
    read from the GCS tables Ray's own ``ray list`` is built on.
    """
    try:
        groups, jobs = _state_api_records()
    except Exception as err:  # noqa: BLE001 -- no dashboard (or an old one): read the GCS instead
        log.debug("no state API (%s): reading the GCS tables", err)
        groups, jobs = _gcs_records()
    return orphans_of(groups, jobs)


def _state_api_records() -> tuple[list[dict], list[dict]]:
    from ray.util.state import list_jobs, list_placement_groups

    # the cluster this process is connected to: without an address the state API looks for "auto", which
    # fails (or finds another one) on a machine that runs more than one Ray
    address = ray.get_runtime_context().gcs_address
    groups = list_placement_groups(address=address, detail=True, limit=STATE_API_LIMIT, raise_on_missing_output=False)
    jobs = list_jobs(address=address, limit=STATE_API_LIMIT, raise_on_missing_output=False)
    return [as_record(group) for group in groups], [as_record(job) for job in jobs]


def as_record(record) -> dict:
    """A state-API record as a dict (Ray returns dicts or its schema dataclasses, depending on version)."""
    if isinstance(record, dict):
        return record
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(vars(record))


def _gcs_records() -> tuple[list[dict], list[dict]]:
    """The same records as :func:`_state_api_records`, from the GCS (private Ray API: a dashboard-less Ray only)."""
    from ray._private import state
    from ray.core.generated import gcs_pb2

    jobs = [{"job_id": job["JobID"], "status": "SUCCEEDED" if job["IsDead"] else "RUNNING"} for job in state.jobs()]
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    groups = []
    for raw in state.state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = group.creator_job_id.hex()
        if group.creator_job_dead:
            jobs.append({"job_id": creator, "status": "SUCCEEDED"})
        groups.append(
            {
                "placement_group_id": group.placement_group_id.hex(),
                "creator_job_id": creator,
                "state": "REMOVED" if group.state == removed else "CREATED",
                "is_detached": group.is_detached,
                "bundles": [{"unit_resources": dict(b.unit_resources)} for b in group.bundles],
            }
        )
    return groups, jobs


def reclaim_orphaned_placement_groups() -> list[Reservation]:
    """Remove every :func:`orphaned_placement_groups` entry; returns those removed (best effort: never raises)."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        orphans = orphaned_placement_groups()
    except Exception as err:  # noqa: BLE001 -- the GCS fallback is internal Ray API: a change there must not stop a run
        log.debug("cannot list placement groups: %s", err)
        return []
    reclaimed = []
    for orphan in orphans:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(orphan.placement_group_id))))
            reclaimed.append(orphan)
        except Exception as err:  # noqa: BLE001 -- already removed by Ray in the meantime
            log.debug("could not remove placement group: %s", err)
    return reclaimed


def resources() -> dict[str, float]:
    """The cluster's total logical resources (``CPU``, ``GPU``, ...)."""
    return ray.cluster_resources()


def has_gpu() -> bool:
    """True when the cluster has at least one GPU."""
    return resources().get("GPU", 0) >= 1


def shortage(workers: int, use_gpu: bool) -> str | None:
    """One line saying that fewer CPUs (GPUs) are free than one training run of ``workers`` needs -- Ray
    Train then retries placing its workers for ever, silently -- or None when they are free now."""
    kind = "GPU" if use_gpu else "CPU"
    free, total = ray.available_resources().get(kind, 0.0), resources().get(kind, 0.0)
    if free >= workers:
        return None
    if total < workers:
        return (
            f"the cluster has {total:g} {kind}s in all and a training run needs {workers}: "
            f"it waits until the cluster grows (autoscaling) -- lower train.num_workers otherwise"
        )
    return (
        f"only {free:g} of the cluster's {total:g} {kind}s are free and a training run needs {workers}: "
        f"it waits until other jobs release them"
    )


def growth_limit(kind: str) -> float | None:
    """How many ``kind`` (``CPU``, ``GPU``) the cluster can grow to: the autoscaler's node types times
    their max counts (what KubeRay / the cluster launcher publish), or None when no autoscaler says."""
    try:
        # Private, but the same call Ray Train makes to size worker groups on autoscaling clusters; no
        # public API has the autoscaler's node types yet.
        from ray._private import state

        limits = state.state.get_max_resources_from_cluster_config()
    except Exception as err:  # noqa: BLE001 -- best effort: an unknown limit falls back to the current size
        log.debug("no autoscaler limits: %s", err)
        return None
    value = (limits or {}).get(kind)
    return float(value) if value else None


def max_concurrent_trials(workers_per_trial: int, use_gpu: bool, trials: int, configured: int | None = None) -> int:
    """How many training runs to start at once: ``configured`` (``--max-concurrent-trials``) when given,
    else GPUs (or CPUs) divided by the workers one run needs, counting what the autoscaler can add --
    so a GPU sweep on a cluster whose GPU workers scale from zero asks for several GPUs, not one. With no
    such resource now and no known limit, every trial starts (each waits for its workers, which is what
    makes an autoscaler add nodes)."""
    if configured:
        return configured
    kind = "GPU" if use_gpu else "CPU"
    total = max(resources().get(kind, 0.0), growth_limit(kind) or 0.0)
    if total < 1:
        return max(1, trials)
    return max(1, min(trials, int(total // max(1, workers_per_trial))))


# A custom resource the cluster configs (infra/) give CPU nodes only: trial drivers ask for a sliver of
# it, so they stay off GPU and spot nodes. A cluster without it (a local Ray) places them anywhere.
TRIAL_DRIVER_RESOURCE = "sors_driver"
TRIAL_DRIVER_MEMORY = 512 << 20  # a trial driver imports torch, Ray Tune and MLflow: hundreds of MB


def trial_resources() -> dict:
    """What each Tune trial (a driver of Ray Train and the evaluation fan-out, no CPU of its own) reserves."""
    wanted = {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}
    if resources().get(TRIAL_DRIVER_RESOURCE, 0) > 0 or growth_limit(TRIAL_DRIVER_RESOURCE):
        wanted[TRIAL_DRIVER_RESOURCE] = 0.001
    return wanted


def shutdown() -> None:
    """Stop the Ray instance this process started (no-op when not connected)."""
    if ray.is_initialized():
        ray.shutdown()
