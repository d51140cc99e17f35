"""Evaluation plans: which cells every evaluated model of a sweep gets (clean, then attacks x eps x
seeds, plus the sanity cells), parsed from a preset's ``evaluation`` section and narrowed by
``attack.*`` overrides; and the typed-field helpers preset parsing shares.

An attack entry is a name or a mapping of :data:`ATTACK_ENTRY_KEYS`: ``eps`` (its own list) and the
attack's config options (:data:`sors.attacks.base.CONFIG_OPTIONS`, each taken only by the attacks whose
``defaults`` hold it): ``steps``, ``eot_samples`` (k of ``ensemble_pgd``), ``random_start`` (PGD-style
attacks start from a uniform point of the ball, as Madry et al.) and ``source`` (transfer attacks:
``trial:<name>`` -- that trial trains before the others --, a checkpoint file or URI, or none: the
undefended model itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from sors import attacks, checks
from sors import config as config_lib
from sors.attacks import base as attack_lib
from sors.attacks.base import CONFIG_OPTIONS
from sors.config import AttackConfig, RunConfig
from sors.errors import ConfigError, quote

TEACHER_PREFIX = "trial:"
ATTACK_ENTRY_KEYS = ("name", "steps", "eot_samples", "eps", "random_start", "source")
EVALUATION_KEYS = ("clean", "attacks", "eps", "seeds", "sanity")


@dataclass(frozen=True)
class EvalPlan:
    """Which cells every evaluated model gets: clean, then attacks x eps x seeds."""

    clean: bool = True
    attacks: tuple[dict, ...] = ()
    eps: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)
    sanity: bool = False  # add the extra cells sors.checks' cross-cell comparisons need

    def cells(self, randomized: bool) -> list[tuple[AttackConfig, str]]:
        """``(attack, role)`` for every cell of one model: the plan's cells ("main"; EOT-style attacks
        only when ``randomized``), then, with
        ``sanity``, the comparison cells :func:`sors.checks.sanity_attacks` asks for ("sanity")."""
        main = [(a, "main") for a in self.attack_configs() if randomized or not _randomized_only(a.name)]
        if not self.sanity:
            return main
        return main + [(a, "sanity") for a in checks.sanity_attacks([a for a, _ in main], randomized)]

    def attack_configs(self) -> list[AttackConfig]:
        """One :class:`AttackConfig` per (attack, eps); ``none`` (clean accuracy) first, at eps 0."""
        cells = [AttackConfig(name="none", eps=0.0)] if self.clean else []
        for entry in self.attacks:
            for eps in entry.get("eps") or self.eps:
                cells.append(
                    AttackConfig(
                        name=entry["name"],
                        eps=float(eps),
                        steps=entry.get("steps"),
                        eot_samples=entry.get("eot_samples"),
                        random_start=entry.get("random_start"),
                        source=entry.get("source"),
                    )
                )
        return cells

    def source_trials(self) -> tuple[str, ...]:
        """Trials the plan's transfer attacks craft on (``source: "trial:<name>"``): they train first."""
        names = [
            str(a["source"])[len(TEACHER_PREFIX) :]
            for a in self.attacks
            if str(a.get("source") or "").startswith(TEACHER_PREFIX)
        ]
        return tuple(dict.fromkeys(names))


def expect(option: str, value: Any, kind: type | tuple[type, ...], allowed: str | None = None) -> Any:
    """``value`` when it is None or of ``kind`` (bool is not an int here), else a ConfigError naming ``option``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return value
    names = {dict: "a mapping", list: "a list", str: "text", bool: "true or false", int: "an integer"}
    wanted = allowed or " or ".join(names.get(k, k.__name__) for k in kinds)
    raise ConfigError(option, f"{quote(value)} is {type(value).__name__}, not {wanted}", wanted)


def as_list(option: str, value: Any) -> list:
    """A list field: None -> []; anything but a list is an error (a bare number is a typo here)."""
    return list(expect(option, value, (list, tuple), "a list") or [])


def as_float(key: str, value: Any) -> float:
    """A number as ``--set`` parses one (accepts fractions such as 25/255)."""
    return config_lib.coerce(key, value, float)


def option_value(key: str, option: str, value: Any) -> Any:
    """A config option of an attack (:data:`sors.attacks.base.CONFIG_OPTIONS`) parsed and checked."""
    spec = CONFIG_OPTIONS[option]
    parsed = config_lib.coerce(key, value, spec.kind | None)
    spec.check(parsed)
    return parsed


def parse_plan(raw: dict, overrides: list[tuple[str, Any]]) -> EvalPlan:
    """The ``evaluation`` section; ``attack.*`` overrides narrow or adjust it."""
    section = expect("evaluation", raw.get("evaluation"), dict) or {}
    unknown = sorted(str(k) for k in section if k not in EVALUATION_KEYS)
    if unknown:
        raise ConfigError("evaluation", f"unknown field(s) {quote(unknown)}", ", ".join(EVALUATION_KEYS))
    attacks = [_attack_entry(entry) for entry in as_list("evaluation.attacks", section.get("attacks"))]
    eps = tuple(as_float("evaluation.eps", e) for e in as_list("evaluation.eps", section.get("eps")))
    seeds = tuple(
        config_lib.coerce("evaluation.seeds", s, int) for s in as_list("evaluation.seeds", section.get("seeds")) or [0]
    )
    clean = expect("evaluation.clean", section.get("clean", True), bool)  # "false" (a string) is not false
    sanity = bool(expect("evaluation.sanity", section.get("sanity", False), bool))
    attacks, eps = apply_attack_overrides(attacks, eps, overrides)
    plan = EvalPlan(clean=clean, attacks=tuple(attacks), eps=eps, seeds=seeds, sanity=sanity)
    for cell in plan.attack_configs():  # the same range checks as a RunConfig's attack section
        config_lib.validate(dataclasses.replace(RunConfig(), attack=cell))
    return plan


def apply_attack_overrides(
    attacks: list[dict], eps: tuple[float, ...], overrides: list[tuple[str, Any]]
) -> tuple[list[dict], tuple[float, ...]]:
    """``--set attack.*`` on a plan's attack entries, the same in every command: ``attack.name`` (a comma
    list) keeps the named attacks (every entry of a kept name; a new name gets its defaults), ``attack.eps``
    (a comma list, pixel scale) replaces the eps grid of every attack, and each other option reaches every
    selected attack that takes it (:func:`sors.attacks.base.takers`) -- an option none of them takes is
    an error naming the attacks that do. Returns (attack entries, eps grid)."""
    for key, value in overrides:
        if key == "attack.name":
            names = [n.strip() for n in str(value).split(",") if n.strip() and n.strip() != "none"]
            attacks = [a for n in names for a in ([a for a in attacks if a["name"] == n] or [{"name": n}])]
    check_attacks(EvalPlan(attacks=tuple(attacks)))
    for key, value in overrides:
        option = key.split(".", 1)[1]
        if option == "eps":
            eps = tuple(as_float(key, e) for e in str(value).split(","))
            attacks = [{k: v for k, v in a.items() if k != "eps"} for a in attacks]
        elif option in CONFIG_OPTIONS:
            parsed = option_value(key, option, value)
            selected = [a["name"] for a in attacks]
            if not attack_lib.takers(option, selected):
                raise ConfigError(
                    key,
                    f"none of the selected attacks ({', '.join(dict.fromkeys(selected)) or 'none'}) takes it",
                    "attacks that do: " + ", ".join(attack_lib.takers(option)),
                )
            attacks = [
                dict(a, **{option: parsed}) if option in attack_lib.option_names(a["name"]) else a for a in attacks
            ]
    return attacks, eps


def _attack_entry(entry: Any) -> dict:
    """One ``evaluation.attacks`` entry (a name, or a mapping of :data:`ATTACK_ENTRY_KEYS`), types checked;
    an option the attack does not take is an error."""
    entry = {"name": entry} if isinstance(entry, str) else dict(expect("evaluation.attacks", entry, (dict, str)) or {})
    unknown = set(entry) - set(ATTACK_ENTRY_KEYS)
    if unknown or not isinstance(entry.get("name"), str):
        raise ConfigError(
            "evaluation.attacks",
            f"bad entry {quote(entry)}",
            "names, or mappings with keys " + ", ".join(ATTACK_ENTRY_KEYS),
        )
    if entry.get("eps") is not None:
        entry["eps"] = tuple(
            as_float("evaluation.attacks.eps", e) for e in as_list("evaluation.attacks.eps", entry["eps"])
        )
    for option in CONFIG_OPTIONS:
        if option not in entry:
            continue
        key = f"evaluation.attacks.{option}"
        if option not in attack_lib.option_names(entry["name"]):
            raise ConfigError(
                key,
                f"attack {entry['name']!r} does not take {option}",
                "attacks that do: " + ", ".join(attack_lib.takers(option)),
            )
        entry[option] = option_value(key, option, entry[option])
    return entry


def check_attacks(plan: EvalPlan) -> None:
    """Every attack of an evaluation plan is registered (ConfigError on ``attack.name`` otherwise)."""
    known = set(attacks.available()) | {"none"}
    for entry in plan.attacks:
        if entry["name"] not in known:
            raise ConfigError("attack.name", f"unknown attack {quote(entry['name'])}", ", ".join(sorted(known)))


def _randomized_only(attack_name: str) -> bool:
    """Attacks that average gradients over random draws of the model (the registry's ``randomized_only``
    fact): on a deterministic model every draw is the same, so they equal PGD at eot_samples times its
    cost -- evaluated on randomized models only."""
    return attack_name in attacks.available() and attacks.info(attack_name)["randomized_only"]


def default_plan(dataset: str) -> EvalPlan:
    """The plan ``sors evaluate`` uses without ``--preset``: clean, the adaptive suite (the headline),
    and the paper's FGSM, PGD and MIM over the paper's eps grid of ``dataset`` (pixel scale), seed 0."""
    return EvalPlan(
        clean=True,
        attacks=({"name": "adaptive"}, {"name": "fgsm"}, {"name": "pgd"}, {"name": "mim"}),
        eps=tuple(attacks.EPS_GRIDS[dataset]),
        seeds=(0,),
    )


def evaluation_plan(plan: EvalPlan, overrides: Sequence[str]) -> EvalPlan:
    """``plan`` with the ``attack.*`` ones of ``overrides`` (``KEY=VALUE``) applied, as a preset's
    ``evaluation`` section gets them."""
    pairs = [(k, v) for k, v in map(config_lib.parse_assignment, overrides) if k.startswith("attack.")]
    return parse_plan({"evaluation": dataclasses.asdict(plan)}, pairs)


def attack_lines() -> list[str]:
    """One line per registered attack: its name, table label and the config options it takes with their
    defaults (what ``sors sweep --list`` prints under the presets)."""
    lines = []
    for name in sorted(attacks.available(), key=lambda n: (attacks.info(n)["order"], n)):
        facts = attacks.info(name)
        options = ", ".join(f"{k}={v}" for k, v in facts["options"].items()) or "no options"
        lines.append(f"{name:16s} {facts['label']:14s} {options}")
    return lines
