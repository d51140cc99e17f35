"""Errors a user can fix: each one names the option at fault and what is allowed.

Every error here pickles with its own arguments (``__reduce__``), so one raised inside a Ray task or a
Ray Train worker reaches the driver as itself, with its one-line message, not as an unpickling error.
"""

from __future__ import annotations

QUOTE_LIMIT = 80  # characters of a user's value quoted in a message; a 100 KB value is not echoed whole


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with a note of the full length when longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class ConfigError(ValueError):
    """A bad option value. ``str(err)`` is one line: ``<option>: <problem>; allowed: <what>``."""

    def __init__(self, option: str, problem: str, allowed: str | None = None):
        self.option = option
        self.problem = problem
        self.allowed = allowed
        message = f"{option}: {problem}"
        if allowed:
            message += f"; allowed: {allowed}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.option, self.problem, self.allowed))


class DataNotFoundError(FileNotFoundError):
    """A data set that is not where we looked; the message says which files, where, and how to get them."""

    def __reduce__(self):
        return (type(self), (str(self),))


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: training stopped (a lower ``train.lr`` usually helps)."""

    def __reduce__(self):
        return (type(self), (str(self),))
