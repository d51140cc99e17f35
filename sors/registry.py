"""One registry shape for every named thing a config can pick (models, attacks, defenses):
register once under a name with the facts other layers need (an attack's table label, a model's
randomness), list the names, look one up with an error that names the config key."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from sors.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name. ``kind`` words the messages ("model"); ``key`` is the config
    key that names an entry ("model.name"), so a bad name reads like any other bad setting."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}
        self._facts: dict[str, dict[str, Any]] = {}

    def add(self, name: str, entry: T, **facts: Any) -> T:
        """Register ``entry`` under ``name`` with its ``facts`` (metadata read by config, presets and
        reports: the one place such a fact lives). A second registration of a name is a bug."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        self._facts[name] = dict(facts)
        return entry

    def register(self, name: str, **facts: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry, **facts)

    def facts(self, name: str) -> dict[str, Any]:
        """The facts ``name`` was registered with (a copy); :class:`ConfigError` for an unknown name."""
        self.check_name(name)
        return dict(self._facts[name])

    def fact(self, name: str, key: str, default: Any = None) -> Any:
        """One fact of ``name`` (``default`` when it was registered without it)."""
        return self.facts(name).get(key, default)

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def check_name(self, name: str) -> None:
        """Raise :class:`ConfigError` on ``self.key`` when ``name`` is not registered."""
        if name not in self._entries:
            raise ConfigError(self.key, f"unknown {self.kind} {name!r}", ", ".join(self.available()))

    def __getitem__(self, name: str) -> T:
        self.check_name(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries
