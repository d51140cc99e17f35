"""Evaluation fan-out: every cell (model x attack x eps x seed) is its own Ray task.

A task loads the checkpoint, runs :func:`tasks.cells.evaluate`, writes its row into the Parquet store
(atomic rename) and returns the row. Cells already in the store are never submitted, so a rerun
runs no task and adds no row. When all the cells of one model are in, the cross-cell sanity checks
(``sors.checks.cross_cell_flags``) run over them and any new flags are written into their rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import ray

from pipeline.cliutil import last_line
from pipeline.store import results
from sors import checks
from sors import data as data_lib
from sors.evaluation import CellResult
from tasks import cells
from tasks.cells import CellSpec, row_to_result

log = logging.getLogger("pipeline.cluster.fanout")


@dataclass
class FanoutSummary:
    """What a fan-out did: rows of all requested cells, how many tasks ran, and failures."""

    rows: list[dict] = field(default_factory=list)
    submitted: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (cell description, error line)


def task_resources(use_gpu: bool = False) -> dict:
    """Resources one cell declares: a CPU, and a quarter GPU when evaluating on GPUs."""
    # scheduling_strategy DEFAULT: do not inherit the (CPU-less) placement group of the Tune trial that submits it
    return {"num_cpus": 1, "num_gpus": 0.25 if use_gpu else 0, "scheduling_strategy": "DEFAULT"}


@ray.remote(max_retries=1)
def evaluate_cell_task(spec: CellSpec, store_root: str) -> dict:
    """Ray task: evaluate one cell and write its row. Returns the row."""
    import torch

    torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    _, row = cells.evaluate(spec, device=device)
    row["node_id"] = ray.get_runtime_context().get_node_id()
    results.write_row(store_root, row)
    return row


def describe(spec: CellSpec) -> str:
    """Short human name of a cell, for progress and errors."""
    attack = "clean" if spec.attack.name == "none" else f"{spec.attack.name} eps={spec.attack.eps:.4f}"
    return f"{spec.variant or spec.trial} {attack} seed={spec.seed}"


def run_cells(
    specs: Iterable[CellSpec], store_root: str, use_gpu: bool = False, on_done: Callable[[dict], None] | None = None
) -> FanoutSummary:
    """Evaluate the cells not yet stored, as parallel Ray tasks; returns the rows of *all* ``specs``.

    ``on_done(row)`` is called as each new cell finishes (progress bars, live metrics).
    """
    specs = list(dict((s.cell_id, s) for s in specs).values())
    summary = FanoutSummary()
    pending = {}
    for spec in specs:
        if results.is_done(store_root, spec):
            summary.skipped += 1
            continue
        ref = evaluate_cell_task.options(**task_resources(use_gpu), name=f"cell:{describe(spec)}").remote(
            spec, store_root
        )
        pending[ref] = spec
    summary.submitted = len(pending)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        spec = pending.pop(ready[0])
        try:
            row = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 -- one broken cell must not lose the others
            summary.failures.append((describe(spec), last_line(err)))
            log.error("cell %s failed: %s", describe(spec), last_line(err))
            continue
        if on_done:
            on_done(row)
    summary.rows = results.rows_for(store_root, specs)
    apply_cross_cell_flags(store_root, summary.rows)
    return summary


def apply_cross_cell_flags(store_root: str, rows: list[dict]) -> int:
    """Run ``sors.checks.cross_cell_flags`` per evaluated model and store new flags. Returns rows changed."""
    changed = 0
    by_model: dict[tuple, list[dict]] = {}
    for row in rows:
        by_model.setdefault((row["checkpoint_sha256"], row["average_paths"], row["seed"]), []).append(row)
    for group in by_model.values():
        group.sort(key=lambda r: (r["attack"] != "none", r["attack"], r["eps"]))
        cell_results = [row_to_result(row, CellResult) for row in group]
        flags = checks.cross_cell_flags(cell_results, num_classes=_num_classes(group[0]))
        by_id = {group[i]["cell_id"]: list(f) for i, f in flags.items() if f}
        changed += results.update_flags(store_root, group, by_id)
        for row in group:  # keep the caller's rows in step with the store
            row["sanity_flags"] = list(row["sanity_flags"]) + [
                f for f in by_id.get(row["cell_id"], []) if f not in row["sanity_flags"]
            ]
    return changed


def _num_classes(row: dict) -> int:
    return data_lib.spec(row["dataset"]).num_classes
