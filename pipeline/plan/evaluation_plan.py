"""Evaluation plans: which cells every evaluated model of a sweep gets (clean, then attacks x eps x
seeds, plus the sanity cells), parsed from a preset's ``evaluation`` section and narrowed by
``attack.*`` overrides; and the typed-field helpers preset parsing shares.

An attack entry is a name or a mapping of :data:`ATTACK_ENTRY_KEYS`: ``steps``, ``eot_samples``
(k of ``ensemble_pgd``), ``eps`` (its own list), ``random_start`` (PGD-style attacks start from a
uniform point of the ball, as Madry et al.) and ``source`` (transfer attacks: ``trial:<name>`` -- that
trial trains before the others --, a checkpoint file or URI, or none: the undefended model itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from sors import attacks, checks
from sors import config as config_lib
from sors.attacks.base import ATTACKS
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


def _expect(option: str, value: Any, kind: type | tuple[type, ...], allowed: str | None = None) -> Any:
    """``value`` when it is None or of ``kind`` (bool is not an int here), else a ConfigError naming ``option``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return value
    names = {dict: "a mapping", list: "a list", str: "text", bool: "true or false", int: "an integer"}
    wanted = allowed or " or ".join(names.get(k, k.__name__) for k in kinds)
    raise ConfigError(option, f"{quote(value)} is {type(value).__name__}, not {wanted}", wanted)


def _list(option: str, value: Any) -> list:
    """A list field: None -> []; anything but a list is an error (a bare number is a typo here)."""
    return list(_expect(option, value, (list, tuple), "a list") or [])


def _float(key: str, value: Any) -> float:
    return config_lib._coerce(key, value, float)  # same parser as --set (accepts 25/255)


def _eval_plan(raw: dict, overrides: list[tuple[str, Any]]) -> EvalPlan:
    """The ``evaluation`` section; ``attack.*`` overrides narrow or adjust it."""
    section = _expect("evaluation", raw.get("evaluation"), dict) or {}
    unknown = sorted(str(k) for k in section if k not in EVALUATION_KEYS)
    if unknown:
        raise ConfigError("evaluation", f"unknown field(s) {quote(unknown)}", ", ".join(EVALUATION_KEYS))
    attacks = [_attack_entry(entry) for entry in _list("evaluation.attacks", section.get("attacks"))]
    eps = tuple(_float("evaluation.eps", e) for e in _list("evaluation.eps", section.get("eps")))
    seeds = tuple(
        config_lib._coerce("evaluation.seeds", s, int) for s in _list("evaluation.seeds", section.get("seeds")) or [0]
    )
    clean = _expect("evaluation.clean", section.get("clean", True), bool)  # "false" (a string) is not false
    sanity = bool(_expect("evaluation.sanity", section.get("sanity", False), bool))
    for key, value in overrides:
        option = key.split(".", 1)[1]
        if option == "name":  # keep only the named attacks (clean accuracy stays as the preset says)
            names = [n.strip() for n in str(value).split(",") if n.strip() and n.strip() != "none"]
            # every entry of a kept name (Table 9 has one per ensemble size k); a new name gets defaults
            attacks = [a for n in names for a in ([a for a in attacks if a["name"] == n] or [{"name": n}])]
        elif option == "eps":
            eps = tuple(_float(key, e) for e in str(value).split(","))
            attacks = [{k: v for k, v in a.items() if k != "eps"} for a in attacks]
        elif option == "steps":
            attacks = [dict(a, steps=config_lib._coerce(key, value, int | None)) for a in attacks]
        elif option == "eot_samples":
            attacks = [
                dict(a, eot_samples=config_lib._coerce(key, value, int | None)) if "eot" in a["name"] else a
                for a in attacks
            ]
    for key, value in overrides:  # after the loop: they apply to the attacks attack.name kept
        option = key.split(".", 1)[1]
        if option == "source":
            source = config_lib._coerce(key, value, str | None)
            attacks = [dict(a, source=source) if _is_transfer(a["name"]) else a for a in attacks]
        elif option == "random_start":  # the attacks that take the option (PGD, MIM, EOT/ensemble PGD...)
            attacks = [
                dict(a, random_start=config_lib._coerce(key, value, bool | None))
                if _takes_random_start(a["name"])
                else a
                for a in attacks
            ]
    plan = EvalPlan(clean=clean, attacks=tuple(attacks), eps=eps, seeds=seeds, sanity=sanity)
    for cell in plan.attack_configs():  # the same range checks as a RunConfig's attack section
        config_lib.validate(dataclasses.replace(RunConfig(), attack=cell))
    return plan


def _attack_entry(entry: Any) -> dict:
    """One ``evaluation.attacks`` entry (a name, or a mapping of :data:`ATTACK_ENTRY_KEYS`), types checked."""
    entry = {"name": entry} if isinstance(entry, str) else dict(_expect("evaluation.attacks", entry, (dict, str)) or {})
    unknown = set(entry) - set(ATTACK_ENTRY_KEYS)
    if unknown or not isinstance(entry.get("name"), str):
        raise ConfigError(
            "evaluation.attacks",
            f"bad entry {quote(entry)}",
            "names, or mappings with keys " + ", ".join(ATTACK_ENTRY_KEYS),
        )
    if entry.get("eps") is not None:
        entry["eps"] = tuple(_float("evaluation.attacks.eps", e) for e in _list("evaluation.attacks.eps", entry["eps"]))
    for key in ("steps", "eot_samples"):
        if key in entry:
            entry[key] = config_lib._coerce(f"evaluation.attacks.{key}", entry[key], int | None)
    if "random_start" in entry:
        entry["random_start"] = config_lib._coerce(
            "evaluation.attacks.random_start", entry["random_start"], bool | None
        )
    if entry.get("source") is not None:
        entry["source"] = config_lib._coerce("evaluation.attacks.source", entry["source"], str)
        if not _is_transfer(entry["name"]):
            raise ConfigError(
                "evaluation.attacks.source",
                f"attack {entry['name']!r} is not a transfer attack",
                "transfer, transfer_fgsm, transfer_pgd or transfer_mim",
            )
    return entry


def _takes_random_start(name: str) -> bool:
    """Whether the white-box attack ``name`` has a ``random_start`` option (transfer attacks set it
    per preset entry: it belongs to their base attack)."""
    builder = ATTACKS[name] if name in attacks.available() else None
    return "random_start" in (getattr(builder, "defaults", None) or {})


def _is_transfer(name: str) -> bool:
    """Whether attack ``name`` is crafted on a source model (the registry's ``transfer`` fact)."""
    return name in attacks.available() and attacks.info(name)["transfer"]


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
    return _eval_plan({"evaluation": dataclasses.asdict(plan)}, pairs)
