"""Typed run configuration: one source of truth, resolved once, validated, hashed.

Every option a user can set lives in a section dataclass below and is addressed as
``section.field`` (``train.lambda``, ``model.n_ops``...). Presets and ``--set`` overrides are
plain dicts/strings applied with :func:`apply_overrides`; :func:`resolve` fills the defaults that
depend on other options and :func:`validate` rejects bad values with a :class:`ConfigError` whose
one-line message names the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from sors.errors import QUOTE_LIMIT, ConfigError, quote


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None  # None: the data set's default location (Fashion-MNIST: the Debian package)
    n_train: int | None = None  # None: the whole split
    n_test: int | None = None
    seed: int = 0  # fixes which subset is drawn
    augment: bool | None = None  # None: on for CIFAR (random crop pad 4 + flip), off otherwise


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sors_lenet5"
    n_ops: int | None = None  # candidates per choice layer; None: the model's default
    members: str | None = None  # ensemble members, e.g. "lenet5*4" or "resnet18,resnet34"
    average_paths: int = 1  # RS*/SORS*: softmax averaged over this many paths per forward
    init: str = "independent"  # super-network candidates: "independent" or "perturbed_copies" (see README recipe)
    init_noise: float = 0.5  # perturbed_copies: noise std relative to each weight tensor's std


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: baseline_epochs, tripled for super-networks (paper, Sec. 3.4)
    baseline_epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()  # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear lr warm-up, in epochs (fractions allowed)
    lambda_: float = 10.0  # weight of the orthogonality loss (key: train.lambda)
    lambda_warmup: float = 0.0  # epochs over which lambda ramps linearly from 0 (fractions allowed)
    paths_per_step: int = 2  # K paths sampled per step for the recognition + orthogonality loss
    teacher: str | None = None  # checkpoint file of a teacher for distillation (Eq. 7)
    kd_weight: float = 1.0
    num_workers: int = 1  # Ray Train data-parallel workers; batch_size is per worker (global batch = both multiplied)
    lr_scaling: str = "none"  # lr for the global batch: "none" (lr as given) or "linear" (lr x num_workers)
    use_gpu: bool | None = None  # None: use a GPU when one is visible
    seed: int = 0


@dataclass(frozen=True)
class AttackConfig:
    name: str = "pgd"
    eps: float = 0.1  # L-inf radius on the pixel scale [0, 1]
    steps: int | None = None  # None: the attack's paper default
    eot_samples: int | None = None  # None: the attack's default (EOT-PGD: 20)
    random_start: bool | None = None  # PGD-style attacks: start from a uniform point of the ball (Madry et al.)
    # transfer attacks: the model to craft on -- a checkpoint file/URI, or "trial:<name>" in a preset
    # (that trial trains first); None: the undefended evaluated model (the gray-box setting of Table 7)
    source: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    repeats: int = 5  # scoring repeated over fresh path draws
    n_examples: int = 1000  # test images per cell
    all_paths: int = 64  # sampled paths for the worst-case ("correct under every path") view
    exact_paths_max: int = 4096  # a super-network with at most this many paths: every path, exactly
    batch_size: int = 250
    seed: int = 0
    # input-transform defense in front of the evaluated model (Table 7): none, median, bit_depth, jpeg,
    # dnn_jpeg; white-box cells attack it through BPDA, transfer cells craft on the undefended model
    defense: str = "none"
    defense_options: str | None = None  # e.g. "quality=50" or "kernel=3,bits=4"; None: the defense's defaults


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "attack": AttackConfig, "eval": EvalConfig}

OPTIMIZERS = ("sgd", "adam")
INITS = ("independent", "perturbed_copies")
LR_SCALINGS = ("none", "linear")
# Options added after models were stored: at these values they leave the config hash as it was, so an
# existing model (same training) is not retrained because the option exists now.
HASH_NEUTRAL_DEFAULTS = {("train", "lr_scaling"): "none"}
# Above this a learning rate only ever diverges (SGD or Adam, on images in [0, 1]): refuse it up front.
MAX_LR = 10.0


def _field_name(key: str) -> str:
    """Config key -> dataclass field (``lambda`` is a Python keyword, stored as ``lambda_``)."""
    return key + "_" if key == "lambda" else key


def _key_name(field_name: str) -> str:
    return field_name.rstrip("_")


def all_keys() -> list[str]:
    """Every settable key, ``section.option``, in declaration order."""
    return [f"{s}.{_key_name(f.name)}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key[:200], all_keys(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    shown = key if len(key) <= QUOTE_LIMIT else quote(key)
    return ConfigError(
        shown,
        f"unknown option{hint}",
        "section.option with section in " + ", ".join(SECTIONS) + "; see `sors train --help-keys`",
    )


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Turn ``value`` (a YAML scalar or a ``--set`` string) into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return coerce(key, value, inner)
    if origin is tuple:
        if value is None or isinstance(value, (str, list, tuple)):
            items = value.split(",") if isinstance(value, str) else list(value or ())
        else:  # a YAML scalar where a list is expected: one item
            items = [value]
        return tuple(coerce(key, v, args[0]) for v in items if str(v).strip() != "")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(key, f"{quote(value)} is not a boolean", "true or false")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(key, f"{quote(value)} is not an integer", "a whole number")
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"{quote(value)} is not an integer", "a whole number") from None
    if annotation is float:
        try:
            number = _parse_float(value)
        except ZeroDivisionError:
            raise ConfigError(key, f"{quote(value)} divides by zero", "a number, e.g. 0.1 or 25/255") from None
        except (TypeError, ValueError, ArithmeticError):
            raise ConfigError(key, f"{quote(value)} is not a number", "a number, e.g. 0.1 or 25/255") from None
        if not math.isfinite(number):
            raise ConfigError(key, f"{quote(value)} is not a finite number", "a finite number")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"{quote(value)} is not a string", "text")
        return str(value)
    raise ConfigError(key, f"unsupported type {annotation}")


def _parse_float(value: Any) -> float:
    """Numbers, and fractions like ``25/255`` (how the paper writes ε)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        return float(num) / float(den)
    return float(value)


def set_option(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """Return ``cfg`` with ``key`` (``section.option``) set to ``value`` coerced to its type."""
    section, _, option = key.partition(".")
    if section not in SECTIONS or not option:
        raise _unknown_key(key)
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    name = _field_name(option)
    if name not in hints:
        raise _unknown_key(key)
    new_section = dataclasses.replace(getattr(cfg, section), **{name: coerce(key, value, hints[name])})
    return dataclasses.replace(cfg, **{section: new_section})


def parse_assignment(text: str) -> tuple[str, str]:
    """``"train.lambda=10"`` -> ``("train.lambda", "10")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"{quote(text)} is not of the form key=value", "section.option=value")
    return key.strip(), value.strip()


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any] | list[str] | None) -> RunConfig:
    """Apply a flat ``{"section.option": value}`` dict, a nested ``{"section": {...}}`` dict,
    or a list of ``key=value`` strings. Unknown keys raise :class:`ConfigError`."""
    for key, value in flatten_overrides(overrides):
        cfg = set_option(cfg, key, value)
    return cfg


def flatten_overrides(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, (list, tuple)):
        return [parse_assignment(item) for item in overrides]
    if not isinstance(overrides, dict):
        raise ConfigError("config", f"expected a mapping of options, got {type(overrides).__name__}")
    flat = []
    for key, value in overrides.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            flat.append((str(key), value))
    return flat


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dict with user-facing key names (``lambda``, not ``lambda_``)."""
    return {
        s: {
            _key_name(k): (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(getattr(cfg, s)).items()
        }
        for s in SECTIONS
    }


def flat_dict(cfg: RunConfig) -> dict[str, Any]:
    """``{"section.option": value}`` for every key: what MLflow params and Parquet rows store."""
    return {f"{s}.{k}": v for s, opts in to_dict(cfg).items() for k, v in opts.items()}


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`to_dict` (also takes flat dicts); unknown keys are errors."""
    return apply_overrides(RunConfig(), data)


def config_hash(cfg: RunConfig, sections: tuple[str, ...] = ("data", "model", "train")) -> str:
    """Stable 16-hex-digit hash of the given sections (default: what determines trained weights)."""
    full = to_dict(cfg)
    payload = {
        s: {k: v for k, v in full[s].items() if HASH_NEUTRAL_DEFAULTS.get((s, k), object()) != v} for s in sections
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def is_super_network(model_name: str) -> bool:
    """True for super-networks (the model registry's ``super_network`` fact; False for an unknown name,
    which validation reports)."""
    # sors.models loads torch (seconds): imported here, not at the top, so that reading and checking a
    # config (the CLI's first step) stays light.
    from sors.models import registry

    return model_name in registry.available() and registry.info(model_name)["super_network"]


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill defaults that depend on other options, then validate. Idempotent."""
    train = cfg.train
    if train.epochs is None:
        factor = 3 if is_super_network(cfg.model.name) else 1
        train = dataclasses.replace(train, epochs=train.baseline_epochs * factor)
    data = cfg.data
    if data.augment is None:
        from sors.data import SPECS  # torch: heavy, see validate

        known = SPECS.get(data.name)  # an unknown name is validate's to report
        data = dataclasses.replace(data, augment=bool(known and known.augment))
    resolved = dataclasses.replace(cfg, train=train, data=data)
    validate(resolved)
    return resolved


def _check(condition: bool, key: str, problem: str, allowed: str) -> None:
    if not condition:
        raise ConfigError(key, problem, allowed)


def validate(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value. Model and attack names are checked
    against their registries by the layers that build them (``sors.models``, ``sors.attacks``)."""
    d, m, t, a, e = cfg.data, cfg.model, cfg.train, cfg.attack, cfg.eval
    _check_types(cfg)
    from sors.data import SPECS  # torch: heavy, see is_super_network (the data sets are sors.data's)

    _check(d.name in SPECS, "data.name", f"unknown data set {d.name!r}", ", ".join(SPECS))
    for key, n in (("data.n_train", d.n_train), ("data.n_test", d.n_test)):
        _check(n is None or n >= 1, key, f"{n} is not a positive count", "an integer >= 1, or none for all")
    _check(m.n_ops is None or m.n_ops >= 1, "model.n_ops", f"m = {m.n_ops} candidates per layer", "an integer >= 1")
    _check(m.init in INITS, "model.init", f"unknown init {m.init!r}", ", ".join(INITS))
    _check(m.init_noise >= 0, "model.init_noise", f"{m.init_noise}", "a number >= 0")
    _check(m.average_paths >= 1, "model.average_paths", f"{m.average_paths}", "an integer >= 1")
    _check(t.epochs is None or t.epochs >= 0, "train.epochs", f"{t.epochs} epochs", "an integer >= 0")
    _check(t.baseline_epochs >= 0, "train.baseline_epochs", f"{t.baseline_epochs}", "an integer >= 0")
    _check(t.batch_size >= 1, "train.batch_size", f"batch size {t.batch_size}", "an integer >= 1")
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", f"unknown optimizer {t.optimizer!r}", ", ".join(OPTIMIZERS))
    _check(0 < t.lr <= MAX_LR, "train.lr", f"learning rate {t.lr}", f"a number > 0 and <= {MAX_LR:g}")
    _check(t.lr_gamma > 0, "train.lr_gamma", f"{t.lr_gamma}", "a number > 0")
    _check(0 <= t.momentum < 1, "train.momentum", f"{t.momentum}", "0 <= momentum < 1")
    _check(t.weight_decay >= 0, "train.weight_decay", f"{t.weight_decay}", "a number >= 0")
    _check(t.lambda_warmup >= 0, "train.lambda_warmup", f"{t.lambda_warmup}", "a number >= 0")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", f"{t.warmup_epochs}", "a number >= 0")
    _check(t.lambda_ >= 0, "train.lambda", f"λ = {t.lambda_} is negative", "a number >= 0")
    _check(t.paths_per_step >= 1, "train.paths_per_step", f"K = {t.paths_per_step}", "an integer >= 1")
    _check(
        t.lambda_ == 0 or t.paths_per_step >= 2,
        "train.paths_per_step",
        f"K = {t.paths_per_step} with λ = {t.lambda_} > 0: the orthogonality loss needs two paths",
        "K >= 2 when train.lambda > 0 (or set train.lambda=0)",
    )
    _check(t.kd_weight >= 0, "train.kd_weight", f"{t.kd_weight}", "a number >= 0")
    _check(t.num_workers >= 1, "train.num_workers", f"{t.num_workers} workers", "an integer >= 1")
    _check(t.lr_scaling in LR_SCALINGS, "train.lr_scaling", f"unknown rule {t.lr_scaling!r}", ", ".join(LR_SCALINGS))
    _check(
        d.n_train is None or d.n_train >= t.num_workers,
        "train.num_workers",
        f"{t.num_workers} workers for data.n_train={d.n_train} examples",
        "at most one worker per training example",
    )
    _check(0 <= a.eps <= 1, "attack.eps", f"ε = {a.eps} is outside the pixel scale", "0 <= eps <= 1 (e.g. 25/255)")
    _check(a.steps is None or a.steps >= 1, "attack.steps", f"{a.steps}", "an integer >= 1")
    _check(a.eot_samples is None or a.eot_samples >= 1, "attack.eot_samples", f"{a.eot_samples}", "an integer >= 1")
    _check(e.repeats >= 1, "eval.repeats", f"{e.repeats}", "an integer >= 1")
    _check(e.n_examples >= 1, "eval.n_examples", f"{e.n_examples}", "an integer >= 1")
    _check(e.all_paths >= 0, "eval.all_paths", f"{e.all_paths}", "an integer >= 0")
    _check(e.exact_paths_max >= 0, "eval.exact_paths_max", f"{e.exact_paths_max}", "an integer >= 0 (0: always sample)")
    _check(e.batch_size >= 1, "eval.batch_size", f"{e.batch_size}", "an integer >= 1")
    defense_options(e)  # raises for an unknown defense, option or value
    _check(
        a.source is None or a.source.strip() != "",
        "attack.source",
        "an empty source",
        "a checkpoint file or URI, trial:<name> in a preset, or none",
    )


def defense_options(e: EvalConfig) -> dict[str, Any]:
    """``eval.defense_options`` parsed (``"quality=50,band=5"`` -> ``{"quality": 50, "band": 5}``), each
    option checked against the defense's own defaults and coerced to their type. ConfigError otherwise."""
    from sors import defenses  # torch: heavy, see is_super_network

    names = ("none",) + tuple(defenses.available())
    _check(e.defense in names, "eval.defense", f"unknown defense {quote(e.defense)}", ", ".join(names))
    if e.defense == "none":
        _check(not e.defense_options, "eval.defense_options", "options without a defense", "set eval.defense too")
        return {}
    defaults = defenses.DEFENSES[e.defense][1]
    options: dict[str, Any] = {}
    for item in (e.defense_options or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        _check(
            bool(sep) and key in defaults,
            "eval.defense_options",
            f"{quote(item)} is not an option of {e.defense}",
            ", ".join(f"{k}=<{type(v).__name__}>" for k, v in defaults.items()),
        )
        options[key] = coerce(f"eval.defense_options.{key}", value.strip(), type(defaults[key]))
        _check(
            not isinstance(options[key], (int, float)) or isinstance(options[key], bool) or options[key] > 0,
            f"eval.defense_options.{key}",
            f"{options[key]}",
            "a number > 0",
        )
    return options


def _check_types(cfg: RunConfig) -> None:
    """Every field holds its declared type and every number is finite -- also for a config built
    without :func:`set_option` (``dataclasses.replace``, a checkpoint's stored dict)."""
    for section, cls in SECTIONS.items():
        values = getattr(cfg, section)
        for name, annotation in typing.get_type_hints(cls).items():
            key = f"{section}.{_key_name(name)}"
            value = getattr(values, name)
            if coerce(key, value, annotation) != value:  # raises for a wrong type or a NaN / inf
                raise ConfigError(key, f"{quote(value)} is not of type {annotation}")
