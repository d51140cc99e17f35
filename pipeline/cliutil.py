"""What every ``sors`` command shares: exit codes, the one-line argument parser, the common flags,
connecting to and shutting down Ray, and reducing an error to the one line a user sees.

Exit codes: 0 done; 1 a regression, a failed check or runs MLflow missed (nightly, bench, sync, a
sweep whose tracking failed); 2 bad input or could not run (one line naming the problem, no
traceback); 130 interrupted (a sweep is resumable with --resume).
"""

from __future__ import annotations

import argparse

from pipeline.redact import redact
from sors.errors import ConfigError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # nightly: a regression; bench: a missed target; sync: a run still failing
EXIT_BAD_INPUT = 2  # nightly: could not run
EXIT_INTERRUPTED = 130


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit code 2, no usage dump."""

    def error(self, message: str):  # noqa: D102 -- argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options every running command takes: Ray, MLflow, folders, ``--set``, progress, verbosity."""
    group = parser.add_argument_group("shared options")
    group.add_argument(
        "--ray-address",
        default=None,
        help="Ray to use: default starts a local Ray sized to this machine; 'auto' joins the cluster "
        "this machine belongs to; or ray://host:port",
    )
    group.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<results>/mlflow.db)",
    )
    group.add_argument("--results-dir", default="results", help="results folder (default ./results)")
    group.add_argument("--data-root", default=None, help="where data sets are (sets data.root for every run)")
    group.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train checkpoints and Tune state: a local/shared folder or s3:// URI (default <results>/ray)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config option, e.g. --set train.lambda=5 (repeatable)",
    )
    group.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="show Ray worker logs")


def add_sweep_flags(parser: argparse.ArgumentParser, dry_run_help: str, allow_large_help: str) -> None:
    """``sors sweep``'s own arguments (the preset and its switches): also what ``sors submit`` forwards."""
    parser.add_argument("preset", nargs="?", help="preset name (smoke, quick, table2, ...) or a YAML file")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--name", default=None, help="sweep name (default: the preset's)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--allow-large", action="store_true", help=allow_large_help)
    parser.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        metavar="N",
        help="trainings at once (default: as many as the cluster holds, autoscaling included)",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, plus ``data.root`` from ``--data-root``."""
    return list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])


def connect(args: argparse.Namespace) -> bool:
    """Connect to Ray as ``--ray-address``/``--num-cpus`` say; True when this call started it (stop it after)."""
    # Ray is a heavy import (seconds): loaded only by the commands that run something, so that
    # `sors --help` and bad input answer at once.
    import ray

    from pipeline.cluster import connection as cluster

    if ray.is_initialized():
        return False
    cluster.connect(args.ray_address, num_cpus=args.num_cpus, quiet=not args.verbose)
    return True


def shutdown(started: bool) -> None:
    """Stop the Ray that :func:`connect` started (nothing when it joined a running one)."""
    if started:
        from pipeline.cluster import connection as cluster  # Ray: heavy import, see connect()

        cluster.shutdown()


# ---------------------------------------------------------------- an error as one line


def _lines(err: BaseException) -> list[str]:
    return [line.strip() for line in str(err).splitlines() if line.strip()]


def first_line(err: BaseException) -> str:
    """The first line of the message (redacted), or the error's type when it has none."""
    lines = _lines(err)
    return redact(lines[0]) if lines else type(err).__name__


def last_line(err: BaseException, limit: int = 300) -> str:
    """The last line of the message (a Ray task error's ``cause`` when it has one), at most ``limit`` characters."""
    lines = _lines(getattr(err, "cause", None) or err)
    return lines[-1][:limit] if lines else type(err).__name__


def root_cause(err: BaseException, limit: int = 400) -> str:
    """The last ``SomethingError: message`` line of a wrapped (Ray, Tune) error: its root cause."""
    lines = _lines(err)
    for line in reversed(lines):
        if "Error:" in line or "Error(" in line:
            return line[:limit]
    return (lines[-1] if lines else type(err).__name__)[:limit]


def original_error(err: BaseException) -> BaseException:
    """The exception first raised, unwrapped from Ray's envelopes: ``RayTaskError.cause``, a Ray Train
    ``WorkerGroupError``'s lowest-rank worker failure, ``__cause__``. (The errors of ``sors.errors``
    pickle with their arguments, so they arrive as themselves.)"""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None) or {}
        inner = getattr(err, "cause", None) or (failures[min(failures)] if failures else None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def tracking_line(err: BaseException) -> str:
    """The most telling line of an MLflow/requests error (they run to several lines), redacted."""
    lines = _lines(err)
    for line in lines:
        if "Connection refused" in line or "Max retries exceeded" in line:
            return redact(f"{type(err).__name__}: {line}")[:300]
    return redact(f"{type(err).__name__}: {lines[0] if lines else ''}")[:300]


def one_line(err: BaseException, plain: tuple[type[BaseException], ...] = ()) -> str:
    """Why a command failed, as one line: the message of errors a user can act on (ConfigError,
    FileNotFoundError and ``plain``), else the root cause's ``SomethingError: message`` line."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, (ConfigError, FileNotFoundError) + tuple(plain)):
        return " ".join(str(err).split())
    text = root_cause(err) if str(err).strip() else type(err).__name__
    return text if "Error" in text.split(":")[0] else f"{type(err).__name__}: {text}"
