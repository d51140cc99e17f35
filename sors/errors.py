"""Errors a user can fix: each one names the option at fault and what is allowed."""


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


class DataNotFoundError(FileNotFoundError):
    """A data set that is not where we looked; the message says which files, where, and how to get them."""
