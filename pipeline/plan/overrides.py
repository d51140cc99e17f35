"""``--set`` overrides, parsed once for every command (``sors train``, ``sweep``, ``evaluate``, presets):
config keys are checked against the typed config, ``attack.*`` keys go to the evaluation plan, where
:func:`pipeline.plan.evaluation_plan.apply_attack_overrides` gives each option to the attacks that take it."""

from __future__ import annotations

from typing import Any

from sors import config as config_lib
from sors.config import RunConfig
from sors.errors import ConfigError

# attack.* keys that take a comma list: they narrow the evaluation plan (names) or set its eps grid
LIST_KEYS = ("attack.name", "attack.eps")


def split_overrides(overrides) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(config overrides, attack.* overrides); every key checked against the config schema.

    ``attack.name`` and ``attack.eps`` take comma lists in every command (they narrow the evaluation plan).
    """
    pairs = config_lib.flatten_overrides(overrides)
    probe = RunConfig()
    for key, value in pairs:
        if key in LIST_KEYS:
            continue  # lists here; parsed by the evaluation plan
        config_lib.set_option(probe, key, value)  # raises ConfigError for unknown keys / bad values
    return [p for p in pairs if not p[0].startswith("attack.")], [p for p in pairs if p[0].startswith("attack.")]


def evaluate_overrides(overrides: list[str]) -> tuple[dict, list]:
    """``sors evaluate --set``: checked like ``sors sweep``'s (unknown keys, types, ranges), and only the
    options that can change an evaluation of a trained checkpoint: ``eval.*``, ``attack.*``, ``data.root``.
    Returns (config overrides, attack.* overrides)."""
    config_pairs, attack_pairs = split_overrides(overrides)
    for key, _ in config_pairs:
        if not key.startswith("eval.") and key != "data.root":
            raise ConfigError(key, "sors evaluate cannot change a trained model", "eval.*, attack.* or data.root")
    config_lib.validate(config_lib.apply_overrides(config_lib.RunConfig(), dict(config_pairs)))
    return dict(config_pairs), attack_pairs
