"""A trained trial's evaluation cells: (checkpoint, each variant) x attacks x eps x seeds, each a
:class:`tasks.cells.CellSpec`, and the transfer sources they craft on. The one cell builder: the sweep's
trainable, ``sors evaluate`` and the completeness check all call :func:`cell_specs`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.errors import SweepError
from pipeline.plan import presets
from pipeline.plan.presets import TrialSpec
from pipeline.store.records import load_record
from sors import train as train_lib
from sors.errors import ConfigError
from tasks import cells as cells_lib
from tasks import storage


def cell_specs(
    trial: TrialSpec,
    record: dict,
    plan: presets.EvalPlan,
    sweep: str,
    code_version: str = "",
    data_root: str | None = None,
    sources: dict[str, dict] | None = None,
) -> list[cells_lib.CellSpec]:
    """Every evaluation cell of a trained trial: (checkpoint, each variant) x attacks x eps x seeds.
    ``sources``: the model records of the trials the plan's transfer attacks craft on (``trial:<name>``)."""
    specs = []
    randomized = presets.is_randomized_arch(trial.config.model.name)
    for variant in trial.evaluated():
        eval_cfg = trial.config.eval
        if variant.defense != "none":
            eval_cfg = dataclasses.replace(eval_cfg, defense=variant.defense, defense_options=variant.defense_options)
        for attack, role in plan.cells(randomized):
            source_uri, source_sha, source_label = transfer_source(attack.source, sources or {})
            for seed in plan.seeds:
                specs.append(
                    cells_lib.CellSpec(
                        checkpoint_uri=record["checkpoint_uri"],
                        checkpoint_sha256=record["checkpoint_sha256"],
                        dataset=trial.config.data.name,
                        attack=attack,
                        eval=eval_cfg,
                        seed=seed,
                        average_paths=variant.average_paths,
                        source_uri=source_uri,
                        source_sha256=source_sha,
                        sweep=sweep,
                        trial=trial.name,
                        variant=variant.name,
                        model_label=variant.label,
                        role=role,
                        source_label=source_label,
                        mlflow_run_id=record.get("mlflow_run_id"),
                        code_version=code_version,
                        data_root=data_root,
                    )
                )
    return specs


def transfer_source(source: str | None, sources: dict[str, dict]) -> tuple[str | None, str | None, str]:
    """``(checkpoint URI, its SHA-256, row name)`` of a transfer attack's source: a trial of the sweep
    (``trial:<name>``, from its record), a checkpoint file or URI, or none (the undefended target)."""
    if not source:
        return None, None, ""
    if source.startswith(presets.TEACHER_PREFIX):
        name = source[len(presets.TEACHER_PREFIX) :]
        record = sources.get(name)
        if not record:
            raise SweepError(f"transfer source {name} has no trained model yet")
        return record["checkpoint_uri"], record["checkpoint_sha256"], record.get("label") or name
    local = storage.local_copy(source)
    label = Path(source).stem if Path(source).stem != "model" else Path(source).parent.name
    return source, storage.file_sha256(local), label


def source_records(results_dir: str, sweep: str, plan: presets.EvalPlan) -> dict[str, dict]:
    """The model records of the plan's source trials that exist (``{trial name: record}``)."""
    found = {name: load_record(results_dir, sweep, name) for name in plan.source_trials()}
    return {name: record for name, record in found.items() if record}


def check_sources(plans) -> None:
    """Every transfer source an evaluation names is a readable checkpoint (one line otherwise)."""
    for plan in plans:
        for source in {a.source for a in plan.attack_configs() if a.source}:
            if source.startswith(presets.TEACHER_PREFIX):
                raise ConfigError(
                    "attack.source",
                    f"{source} is a trial reference, which works in a preset only",
                    "a checkpoint file or URI",
                )
            local = storage.local_copy(source)
            train_lib.checkpoint_config(local, train_lib.read_checkpoint(local))
