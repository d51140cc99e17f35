"""``sors evaluate``'s ``--set`` overrides and evaluation plan: only the options that can change the
evaluation of a trained checkpoint, checked as a sweep checks them."""

from __future__ import annotations

from pipeline.plan import presets
from pipeline.plan.evaluation_plan import EvalPlan
from sors import config as config_lib
from sors import train as train_lib
from sors.errors import ConfigError
from tasks import storage


def evaluate_overrides(overrides: list[str]) -> tuple[dict, list]:
    """``sors evaluate --set``: checked like ``sors sweep``'s (unknown keys, types, ranges), and only the
    options that can change an evaluation of a trained checkpoint: ``eval.*``, ``attack.*``, ``data.root``.
    Returns (config overrides, attack.* overrides)."""

    config_pairs, attack_pairs = presets._split_overrides(overrides)
    for key, _ in config_pairs:
        if not key.startswith("eval.") and key != "data.root":
            raise ConfigError(key, "sors evaluate cannot change a trained model", "eval.*, attack.* or data.root")
    config_lib.validate(config_lib.apply_overrides(config_lib.RunConfig(), dict(config_pairs)))
    return dict(config_pairs), attack_pairs


def evaluate_plan(preset: str | None, overrides: list[str], dataset: str) -> EvalPlan:
    """The cells to score: a preset's evaluation plan, or the default one for ``dataset``, narrowed by
    ``attack.*`` overrides; every attack name checked."""

    if preset:
        return presets.build_sweep(preset, overrides).evaluation
    plan = presets.evaluation_plan(presets.default_plan(dataset), overrides)
    presets.check_attacks(plan)
    return plan


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
