"""One registry shape for every named thing a config can pick (models, attacks, defenses):
register once under a name, list the names, look one up with an error that names the config key."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from sors.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name. ``kind`` words the messages ("model"); ``key`` is the config
    key that names an entry ("model.name"), so a bad name reads like any other bad setting."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second registration of a name is a bug, not an override."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

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
