"""Errors a sweep raises to its caller, each with a one-line message that says which trial or cell and why."""

from __future__ import annotations


class SweepError(RuntimeError):
    """A trial or cell failed; the one-line message names which and why. ``cause``: the original
    exception raised in the trial, its Ray Train worker or its Ray task (see :func:`pipeline.cliutil.original_error`)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class SweepInterrupted(RuntimeError):
    """The sweep stopped before finishing (Ctrl-C); rerun with ``--resume`` to continue."""
