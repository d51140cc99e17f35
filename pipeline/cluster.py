"""Connecting to Ray: a local instance sized to the machine, or an existing cluster (``auto`` / an address)."""

from __future__ import annotations

import logging
import os
import warnings

import ray


def connect(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None,
            quiet: bool = True) -> None:
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
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    options = {"log_to_driver": not quiet, "include_dashboard": False, "configure_logging": True,
               "logging_level": logging.WARNING if quiet else logging.INFO}
    if address in (None, "", "local"):
        # A local machine is not a spot instance: skip Train V2's per-run preemption-watcher actor
        # (one Python process less per training run).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # address="local": always a new local instance, never a `ray start` cluster someone left on this machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=object_store_memory,
                 **options)
    else:
        ray.init(address=address, **options)


def resources() -> dict[str, float]:
    """The cluster's total logical resources (``CPU``, ``GPU``, ...)."""
    return ray.cluster_resources()


def has_gpu() -> bool:
    """True when the cluster has at least one GPU."""
    return resources().get("GPU", 0) >= 1


def max_concurrent_trials(workers_per_trial: int, use_gpu: bool) -> int:
    """How many training runs fit at once: GPUs (or CPUs) divided by the workers one run needs."""
    total = resources().get("GPU" if use_gpu else "CPU", 1)
    return max(1, int(total // max(1, workers_per_trial)))


def shutdown() -> None:
    """Stop the Ray instance this process started (no-op when not connected)."""
    if ray.is_initialized():
        ray.shutdown()
