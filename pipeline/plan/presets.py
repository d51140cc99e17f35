"""Sweep presets: YAML data files (``pipeline/presets/*.yaml``) -> fully resolved trial specs.

A preset names its trials, the options each one sets on top of a shared ``base``, optional Tune
grids (one trial per grid point), evaluation variants of a trial's checkpoint (RS*, SORS*), and the
evaluation plan (attacks x eps x seeds). ``--set key=value`` overrides apply last, to every trial, so a
trial is fully determined by preset + overrides. Format::

    name: quick
    base: {data.name: fashion_mnist, train.lr: 0.002}
    trials:
      - name: sors                      # Tune trial id (letters, digits, _ -)
        label: SORS                     # row name in reports
        set: {model.name: sors_lenet5, train.teacher: "trial:lenet5"}   # teacher = another trial
        evaluate: true                  # false: train only (a teacher), no cells, no table row
        grid: {train.lambda: [0, 10]}   # optional: one trial per value
        variants: [{name: sors_star, label: "SORS*", set: {model.average_paths: 2}}]
    evaluation:
      clean: true
      attacks: [{name: pgd, steps: 7}, {name: cw, eps: [0]}]   # per-attack eps list optional
      eps: [25/255, 50/255]
      seeds: [0]
      sanity: true                      # + the cells sors.checks' cross-cell comparisons need
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.plan.evaluation_plan import (  # noqa: F401 (re-exported)
    ATTACK_ENTRY_KEYS,
    EVALUATION_KEYS,
    TEACHER_PREFIX,
    EvalPlan,
    as_list,
    check_attacks,
    default_plan,
    evaluation_plan,
    expect,
    parse_plan,
)
from pipeline.plan.overrides import split_overrides
from sors import config as config_lib
from sors.config import RunConfig
from sors.errors import ConfigError, quote
from sors.models import factory, registry

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What an evaluation variant may change: it re-scores a trained checkpoint, so only inference options.
VARIANT_KEYS = ("model.average_paths", "eval.defense", "eval.defense_options")
# `nightly`: the settings of a nightly config written in preset format (read by `sors nightly`)
PRESET_KEYS = ("name", "description", "base", "trials", "evaluation", "nightly")
MAX_PRESET_BYTES = 1 << 20  # a preset is a page of YAML; anything near this is not one
MAX_NAME_CHARS = 100


class _PresetLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases: presets need none, and ``*alias`` chains are how a
    few hundred bytes of YAML ("billion laughs") expand into more memory than the machine has."""

    def compose_node(self, parent, index):  # noqa: D102 -- PyYAML API
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(
                "preset",
                f"YAML alias at line {mark.line + 1} (aliases and anchors are not allowed in presets)",
                "plain YAML: repeat the values",
            )
        return super().compose_node(parent, index)


def check_component(option: str, value: Any) -> str:
    """``value`` as a name that becomes one file or folder name under the results folder (a sweep,
    a label, a preset's ``name``): no path separators, no leading dot (``.``, ``..``, hidden files), no
    control characters, at most :data:`MAX_NAME_CHARS` characters. ConfigError naming ``option`` otherwise."""
    text = value if isinstance(value, str) else str(value)
    bad = (
        not text
        or text.startswith(".")
        or len(text) > MAX_NAME_CHARS
        or any(c in text for c in "/\\:")
        or any(ord(c) < 32 or ord(c) == 127 for c in text)
        or text != text.strip()
    )
    if bad or not isinstance(value, str):
        raise ConfigError(
            option,
            f"{quote(value)} is not a safe name (it becomes a file name)",
            f"one path component of at most {MAX_NAME_CHARS} characters: no / \\ : or control "
            "characters, not starting with a dot",
        )
    return text


@dataclass(frozen=True)
class Variant:
    """An evaluation-time variant of a trial's checkpoint (``average_paths`` > 1: RS*/SORS*; a
    ``defense``: the checkpoint behind an input transform, Table 7)."""

    name: str
    label: str
    average_paths: int = 1
    defense: str = "none"
    defense_options: str | None = None


@dataclass(frozen=True)
class TrialSpec:
    """One Tune trial: a resolved config plus how its rows are named in reports."""

    name: str
    label: str
    config: RunConfig
    variants: tuple[Variant, ...] = ()
    evaluate: bool = True  # False: trained only (a teacher), no evaluation cells and no table row

    @property
    def teacher_trial(self) -> str | None:
        """Name of the trial this one distils from (``train.teacher: "trial:<name>"``), or None."""
        teacher = self.config.train.teacher or ""
        return teacher[len(TEACHER_PREFIX) :] if teacher.startswith(TEACHER_PREFIX) else None

    def evaluated(self) -> tuple[Variant, ...]:
        """The checkpoint as trained, then its variants: every row this trial contributes (none for a
        trial with ``evaluate: false``)."""
        if not self.evaluate:
            return ()
        return (Variant(self.name, self.label, 1),) + self.variants


@dataclass(frozen=True)
class Sweep:
    """A resolved preset: named trials (in order) and the evaluation plan."""

    name: str
    preset: str
    description: str
    trials: tuple[TrialSpec, ...]
    evaluation: EvalPlan = field(default_factory=EvalPlan)

    def trial(self, name: str) -> TrialSpec:
        """The trial called ``name`` (ConfigError if none)."""
        for t in self.trials:
            if t.name == name:
                return t
        raise ConfigError("trial", f"no trial named {name!r}", ", ".join(t.name for t in self.trials))


def available() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A shipped preset by name, or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if not _NAME.fullmatch(name_or_path):  # a name, not a path: it must not leave the presets folder
        raise ConfigError(
            "preset", f"unknown preset {quote(name_or_path)}", ", ".join(available()) + ", or a .yaml file"
        )
    shipped = PRESET_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError("preset", f"unknown preset {name_or_path!r}", ", ".join(available()) + ", or a .yaml file")
    return shipped


def load_raw(name_or_path: str) -> dict:
    """The preset file parsed as YAML (a mapping)."""
    path = preset_path(name_or_path)
    with open(path, "rb") as handle:
        data = handle.read(MAX_PRESET_BYTES + 1)
    if len(data) > MAX_PRESET_BYTES:
        raise ConfigError("preset", f"{path}: larger than {MAX_PRESET_BYTES >> 20} MiB", "a YAML preset file")
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_PresetLoader)  # noqa: S506 -- a SafeLoader subclass
    except ConfigError as err:  # an alias, from _PresetLoader
        raise ConfigError("preset", f"{path}: {err.problem}", err.allowed) from None
    except UnicodeDecodeError:
        raise ConfigError("preset", f"{path}: not a text file (not UTF-8)", "a YAML preset file") from None
    except yaml.YAMLError as err:
        raise ConfigError("preset", f"{path}: not valid YAML ({str(err).splitlines()[0][:120]})") from None
    except RecursionError:
        raise ConfigError("preset", f"{path}: nested too deeply", "a YAML preset file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("trials"), list) or not raw["trials"]:
        raise ConfigError("preset", f"{path}: expected a mapping with a non-empty 'trials' list")
    unknown = sorted(str(k) for k in raw if k not in PRESET_KEYS)
    if unknown:
        raise ConfigError(f"preset {path.name}", f"unknown field(s) {quote(unknown)}", ", ".join(PRESET_KEYS))
    expect("base", raw.get("base"), dict)
    expect("evaluation", raw.get("evaluation"), dict)
    return raw


def _grid_points(grid: dict) -> list[dict]:
    """Cartesian product of ``{key: [values]}`` as a list of ``{key: value}`` (one empty dict if no grid)."""
    if not expect("grid", grid, dict):
        return [{}]
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"grid.{key}", f"{quote(grid[key])} is not a non-empty list")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _grid_suffix(point: dict) -> tuple[str, str]:
    """Trial-name and label suffixes for a grid point, e.g. ``-lambda10`` and `` (lambda=10)``."""
    if not point:
        return "", ""
    short = {k: k.split(".", 1)[1] for k in point}
    name = "".join(f"-{short[k]}{v}" for k, v in point.items())
    label = ", ".join(f"{short[k]}={v}" for k, v in point.items())
    return name, f" ({label})"


def _variants(trial_name: str, raw_variants: list | None) -> tuple[Variant, ...]:
    variants = []
    for i, entry in enumerate(as_list(f"trials.{trial_name}.variants", raw_variants)):
        expect(f"trials.{trial_name}.variants", entry, dict)
        settings = dict(expect(f"variants.{trial_name}.set", entry.get("set"), dict) or {})
        unknown = set(settings) - set(VARIANT_KEYS)
        if unknown:
            raise ConfigError(
                f"variants.{sorted(unknown)[0]}",
                "an evaluation variant cannot change training",
                ", ".join(VARIANT_KEYS),
            )
        k = config_lib.coerce("model.average_paths", settings.get("model.average_paths", 1), int)
        defense = config_lib.coerce("eval.defense", settings.get("eval.defense", "none"), str)
        defense_options = config_lib.coerce("eval.defense_options", settings.get("eval.defense_options"), str | None)
        config_lib.defense_options(config_lib.EvalConfig(defense=defense, defense_options=defense_options))
        name = entry.get("name") or f"{trial_name}_v{i + 1}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"trials.{trial_name}.variants", f"bad variant name {quote(name)}", "letters, digits, _ . -"
            )
        label = expect(f"variants.{name}.label", entry.get("label"), str) or name
        variants.append(
            Variant(name=name, label=label, average_paths=k, defense=defense, defense_options=defense_options)
        )
    return tuple(variants)


def build_sweep(name_or_path: str, overrides=None, sweep_name: str | None = None) -> Sweep:
    """Resolve a preset and ``--set`` overrides into a :class:`Sweep` (ConfigError on any bad key/value)."""
    raw = load_raw(name_or_path)
    config_overrides, attack_overrides = split_overrides(overrides)
    base = config_lib.apply_overrides(RunConfig(), raw.get("base") or {})
    trials = []
    for entry in raw["trials"]:
        if not isinstance(entry, dict) or not _NAME.fullmatch(str(entry.get("name", ""))):
            raise ConfigError(
                "trials", f"bad trial entry {quote(entry)}", "mappings with a 'name' of letters, digits, _ . -"
            )
        unknown = set(entry) - {"name", "label", "set", "grid", "variants", "evaluate"}
        if unknown:
            raise ConfigError(
                f"trials.{entry['name']}",
                f"unknown field(s) {sorted(unknown)}",
                "name, label, set, grid, variants, evaluate",
            )
        evaluate = expect(f"trials.{entry['name']}.evaluate", entry.get("evaluate", True), bool)
        expect(f"trials.{entry['name']}.set", entry.get("set"), dict)
        expect(f"trials.{entry['name']}.label", entry.get("label"), str)
        for point in _grid_points(entry.get("grid") or {}):
            cfg = config_lib.apply_overrides(base, entry.get("set") or {})
            cfg = config_lib.apply_overrides(cfg, point)
            cfg = config_lib.resolve(config_lib.apply_overrides(cfg, dict(config_overrides)))
            name_suffix, label_suffix = _grid_suffix(point)
            name = f"{entry['name']}{name_suffix}"
            trials.append(
                TrialSpec(
                    name=name,
                    label=f"{entry.get('label') or entry['name']}{label_suffix}",
                    config=cfg,
                    variants=_variants(name, entry.get("variants")),
                    evaluate=evaluate,
                )
            )
    _check_unique([t.name for t in trials] + [v.name for t in trials for v in t.variants])
    plan = parse_plan(raw, attack_overrides)
    trials = _without_unused(trials, plan.source_trials())
    name = check_component(
        "--name" if sweep_name else "preset name", sweep_name or raw.get("name") or Path(name_or_path).stem
    )
    sweep = Sweep(
        name=name,
        preset=str(raw.get("name") or name_or_path),
        description=str(raw.get("description", "")),
        trials=tuple(trials),
        evaluation=plan,
    )
    _check_names(sweep)
    for source in sweep.evaluation.source_trials():
        if not any(t.name == source for t in sweep.trials):
            raise ConfigError(
                "attack.source",
                f"transfer source trial {source!r} is not a trial of this preset",
                ", ".join(t.name for t in sweep.trials),
            )
    stages(sweep.trials, sweep.evaluation.source_trials())  # rejects unknown or circular teachers now
    return sweep


def _without_unused(trials: list[TrialSpec], sources: Sequence[str]) -> list[TrialSpec]:
    """``trials`` less the train-only ones (``evaluate: false``) that no trial distils from and no transfer
    attack crafts on -- e.g. the paper presets' ResNet-18 teacher under ``--set train.teacher=none``:
    hours of CPU for a model nothing reads."""
    used = {t.teacher_trial for t in trials} | set(sources)
    return [t for t in trials if t.evaluate or t.name in used]


def _check_unique(names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError("trials", f"two trials or variants are named {name!r}", "unique names")
        seen.add(name)


def _check_names(sweep: Sweep) -> None:
    """Model and attack names against their registries, before anything is launched."""
    for trial in sweep.trials:
        factory.model_size(trial.config)  # the model, every ensemble member, and options the model takes
    check_attacks(sweep.evaluation)


def stages(trials: tuple[TrialSpec, ...] | list[TrialSpec], sources: Sequence[str] = ()) -> list[list[TrialSpec]]:
    """Trials grouped so every teacher is in an earlier group than its students (topological levels),
    and every transfer source (with its teachers) before every other trial, whose cells craft on it."""
    by_name = {t.name: t for t in trials}
    level: dict[str, int] = {}

    def depth(trial: TrialSpec, seen: tuple[str, ...] = ()) -> int:
        if trial.name in level:
            return level[trial.name]
        teacher = trial.teacher_trial
        if teacher is None:
            level[trial.name] = 0
            return 0
        if teacher not in by_name:
            raise ConfigError(
                "train.teacher", f"trial {trial.name!r} distils from unknown trial {teacher!r}", ", ".join(by_name)
            )
        if teacher in seen + (trial.name,):
            raise ConfigError("train.teacher", f"circular teachers: {' -> '.join(seen + (trial.name, teacher))}")
        level[trial.name] = depth(by_name[teacher], seen + (trial.name,)) + 1
        return level[trial.name]

    for trial in trials:
        depth(trial)
    early = set()
    for name in sources:
        while name and name not in early:  # a source and the chain of teachers it distils from
            early.add(name)
            name = by_name[name].teacher_trial if name in by_name else None
    if early:
        shift = max(level[n] for n in early if n in level) + 1
        level = {n: (v if n in early else v + shift) for n, v in level.items()}
    groups = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for trial in trials:
        groups[level[trial.name]].append(trial)
    return groups


def is_randomized_arch(model_name: str) -> bool:
    """Models whose forward pass is random (super-networks, RSE): scored with repeats and all-path views
    (the model registry's ``randomized`` fact)."""
    return registry.info(model_name)["randomized"]


def with_teacher(trial: TrialSpec, checkpoint_uri: str) -> TrialSpec:
    """``trial`` with its ``trial:<name>`` teacher reference replaced by the teacher's checkpoint."""
    cfg = config_lib.set_option(trial.config, "train.teacher", checkpoint_uri)
    return dataclasses.replace(trial, config=cfg)


def trial_to_dict(trial: TrialSpec) -> dict:
    """Plain-data form (what travels in a Tune ``param_space``)."""
    return {
        "name": trial.name,
        "label": trial.label,
        "config": config_lib.to_dict(trial.config),
        "variants": [dataclasses.asdict(v) for v in trial.variants],
        "evaluate": trial.evaluate,
    }


def trial_from_dict(data: dict) -> TrialSpec:
    """Inverse of :func:`trial_to_dict`."""
    return TrialSpec(
        name=data["name"],
        label=data["label"],
        config=config_lib.from_dict(data["config"]),
        variants=tuple(Variant(**v) for v in data.get("variants", ())),
        evaluate=bool(data.get("evaluate", True)),
    )


def single_trial_sweep(
    overrides=None, sweep_name: str = "train", trial_name: str | None = None, evaluation: EvalPlan | None = None
) -> Sweep:
    """A one-trial sweep from the config defaults + ``--set`` overrides (what ``sors train`` runs)."""
    config_overrides, attack_overrides = split_overrides(overrides)
    cfg = config_lib.resolve(config_lib.apply_overrides(RunConfig(), dict(config_overrides)))
    name = trial_name or cfg.model.name
    if not _NAME.fullmatch(name):
        raise ConfigError("--name", f"{quote(name)} is not a valid name", "letters, digits, _ . -")
    trial = TrialSpec(name=name, label=name, config=cfg)
    sweep = Sweep(
        name=sweep_name,
        preset="train",
        description="single training run",
        trials=(trial,),
        evaluation=evaluation or EvalPlan(clean=False),
    )
    _check_names(sweep)
    if trial.teacher_trial:
        raise ConfigError("train.teacher", "a single run cannot refer to another trial", "a checkpoint file or URI")
    return sweep


def evaluate_plan(preset: str | None, overrides: list[str], dataset: str) -> EvalPlan:
    """The cells to score: a preset's evaluation plan, or the default one for ``dataset``, narrowed by
    ``attack.*`` overrides; every attack name checked."""
    if preset:
        return build_sweep(preset, overrides).evaluation
    plan = evaluation_plan(default_plan(dataset), overrides)
    check_attacks(plan)
    return plan
