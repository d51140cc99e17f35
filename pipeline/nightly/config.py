"""The nightly's configuration: the ``nightly:`` section (:class:`Settings`) and :func:`load_config`,
which resolves a preset-format YAML into the sweep a nightly runs."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.plan import presets
from sors.errors import ConfigError

LAST_ACCEPTED = "last-accepted"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RUN_ID = re.compile(r"^(\d{8})T\d{6}Z-[0-9a-f]{4}$")


class NightlyError(RuntimeError):
    """The nightly could not run (exit 2); the message is one line saying why."""


@dataclass(frozen=True)
class Settings:
    """The ``nightly:`` section. Drops are in accuracy points (percentage points, 2.0 = 2 %)."""

    baseline: str = LAST_ACCEPTED  # or a run id: compare against that run instead (pinned)
    min_drop: float = 2.0  # attacked cells: a regression must lose more than this many points
    clean_min_drop: float = 2.0  # clean-accuracy cells: the same, for a "clean-drop"
    new_warnings: str = "fail"  # a sanity warning the baseline cell lacked: "fail" or "report"
    alpha: float = 0.05  # family-wise level of the paired tests (Holm over the night's compared cells)

    def check(self) -> "Settings":
        """Validate; returns self (ConfigError names the bad key)."""
        for key in ("min_drop", "clean_min_drop"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
                raise ConfigError(f"nightly.{key}", f"{value!r}", "accuracy points between 0 and 100")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < 1:
            raise ConfigError("nightly.alpha", f"{self.alpha!r}", "a significance level between 0 and 1, such as 0.05")
        if self.new_warnings not in ("fail", "report"):
            raise ConfigError("nightly.new_warnings", f"{self.new_warnings!r}", "fail or report")
        if self.baseline != LAST_ACCEPTED and not RUN_ID.match(str(self.baseline)):
            raise ConfigError(
                "nightly.baseline",
                f"{self.baseline!r} is not a run id",
                f"{LAST_ACCEPTED} or a run id such as 20250102T020000Z-3f9a",
            )
        return self


@dataclass(frozen=True)
class NightlyConfig:
    """A resolved nightly: its name, the sweep it runs (trials + evaluation plan) and its settings."""

    name: str
    path: Path
    sweep: Any  # pipeline.plan.presets.Sweep
    settings: Settings


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> NightlyConfig:
    """Read a nightly YAML and resolve its sweep with ``--set`` ``overrides`` (ConfigError on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"{path} does not exist", "a nightly YAML such as infra/nightly/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path}: expected a mapping")
    name = str(raw.get("name") or path.stem)
    if not _NAME.match(name):
        raise ConfigError("name", f"{name!r}", "letters, digits, _ . -")
    section = raw.get("nightly") or {}
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"nightly.{sorted(unknown)[0]}", "unknown setting", ", ".join(sorted(known)))
    settings = Settings(**section).check()
    if raw.get("trials"):
        source = str(path)
    elif raw.get("preset"):
        relative = path.parent / str(raw["preset"])
        source = str(relative) if relative.is_file() else str(raw["preset"])
    else:
        raise ConfigError("--config", f"{path}: needs `trials` (preset format) or `preset: NAME`")
    preset_set = [f"{k}={_scalar(v)}" for k, v in (raw.get("set") or {}).items()]
    sweep = presets.build_sweep(source, preset_set + list(overrides), sweep_name=f"nightly-{name}")
    return NightlyConfig(name=name, path=path, sweep=sweep, settings=settings)


def _scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
