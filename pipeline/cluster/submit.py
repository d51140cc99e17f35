"""``sors submit``: a sweep as a Ray job on a cluster, through the Jobs API (``JobSubmissionClient``).

The job's driver runs on the cluster's head, so it outlives the submitting shell (an SSH session, a
CronJob pod). The submission id is derived from the sweep -- ``sors-<sweep>-<8 hex digits of the
command>`` -- so submitting the same sweep again while it runs is refused instead of starting it twice;
a finished one is submitted again as ``...-2``, ``-3``. By default the command follows the job's logs
and exits with the job's own exit code (the driver's, i.e. ``sors sweep``'s): 0 done, 1, 2 as
``sors sweep`` returns them, 130 when the job was stopped. With ``RAY_AUTH_TOKEN`` set the token goes
in every request (Ray token authentication).

    sors submit quick --address http://127.0.0.1:8265 [--set ...] [--no-wait]
    sors submit --status sors-quick-1a2b3c4d --address ...
    sors submit --stop sors-quick-1a2b3c4d --address ...
    sors submit --address ... [--submission-id ID] -- sors nightly --config ... --ray-address auto

After ``--``, any other ``sors`` command runs as the job instead (the nightly CronJob uses this), with
the same following and exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shlex
import sys
import time

from pipeline import cliutil
from pipeline.cliutil import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, OneLineArgumentParser
from pipeline.plan import presets
from pipeline.redact import redact

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # Ray's own variable for the Jobs API address (also RAY_ADDRESS)
TOKEN_ENV = "RAY_AUTH_TOKEN"
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(Exception):
    """Bad input or an unreachable / refusing Jobs API: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """``sors submit``'s parser: its own options plus every ``sors sweep`` flag (forwarded to the job)."""
    parser = OneLineArgumentParser(prog="sors submit", description="run `sors sweep PRESET ...` as a Ray job")
    cliutil.add_sweep_flags(
        parser,
        "check the sweep's inputs on the cluster, run nothing",
        "run models over 2 GiB of weights or 64 ensemble members",
    )
    cliutil.add_common(parser)
    job = parser.add_argument_group("job options")
    job.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV) or None,
        help=f"Jobs API of the cluster, http://HOST:8265 (default ${ADDRESS_ENV})",
    )
    job.add_argument("--no-wait", action="store_true", help="submit, print the id and return")
    job.add_argument(
        "--status", metavar="ID", default=None, help="print a job's status; exit with its code if it ended"
    )
    job.add_argument("--stop", metavar="ID", default=None, help="stop a job")
    job.add_argument("--submission-id", default=None, help="the job's id (default: derived from the sweep)")
    job.add_argument(
        "--working-dir",
        default=None,
        help="upload this folder as the job's working directory (default: the project installed on the cluster)",
    )
    return parser


def sweep_command(argv: list[str]) -> list[str]:
    """The job's entry point: ``sors sweep`` with the forwarded flags, joining the job's cluster."""
    return ["sors", "sweep", *argv, "--ray-address", "auto"]


def forwarded(argv: list[str]) -> list[str]:
    """``argv`` without ``sors submit``'s own options (what the job's ``sors sweep`` receives)."""
    own_flags, own_values = {"--no-wait"}, {"--address", "--status", "--stop", "--working-dir", "--submission-id"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in own_values:
            skip = "=" not in arg
            continue
        if name not in own_flags:
            out.append(arg)
    return out


def base_submission_id(sweep_name: str, command: list[str]) -> str:
    """``sors-<sweep>-<8 hex of the command>``: the same sweep command gets the same id."""
    digest = hashlib.sha256(shlex.join(command).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in sweep_name)[:60]
    return f"sors-{safe}-{digest}"


def client(address: str):
    """A ``JobSubmissionClient`` for ``address``, sending ``RAY_AUTH_TOKEN`` as a bearer token when set."""
    from ray.job_submission import JobSubmissionClient  # heavy

    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # noqa: BLE001 -- connection refused, 401, bad URL: all one line
        raise SubmitError(f"--address {redact(address)}: cannot reach the Ray Jobs API ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return redact(text.splitlines()[0][:300]) if text else type(err).__name__


def _job_info(jobs, submission_id: str):
    try:
        return jobs.get_job_info(submission_id)
    except RuntimeError as err:  # the SDK raises RuntimeError for a 404
        if "404" in str(err) or "does not exist" in str(err):
            return None
        raise SubmitError(f"job {submission_id}: {_first_line(err)}") from None


def free_submission_id(jobs, base: str) -> str:
    """``base``, or ``base-N`` after earlier finished runs; SubmitError while one of them still runs."""
    candidate, n = base, 1
    while True:
        info = _job_info(jobs, candidate)
        if info is None:
            return candidate
        if str(info.status) not in ENDED:
            raise SubmitError(
                f"this sweep is already submitted as {candidate} ({info.status}): follow it with "
                f"`sors submit --status {candidate}` or stop it with `sors submit --stop {candidate}`"
            )
        n += 1
        candidate = f"{base}-{n}"


def exit_code(info) -> int:
    """Our exit code for an ended job: the driver's own, 130 when stopped, 2 when it never ran."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return EXIT_OK
    if status == "STOPPED":
        return EXIT_INTERRUPTED
    code = getattr(info, "driver_exit_code", None)
    return int(code) if code not in (None, 0) else EXIT_BAD_INPUT


def follow(jobs, submission_id: str) -> int:
    """Print the job's logs as they come; return its exit code once it has ended."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(submission_id):
            print(redact(lines), end="", flush=True)

    asyncio.run(tail())
    info = _job_info(jobs, submission_id)
    while info is not None and str(info.status) not in ENDED:  # logs closed a moment before the status moved
        time.sleep(1)
        info = _job_info(jobs, submission_id)
    return _report(submission_id, info)


def _report(submission_id: str, info) -> int:
    if info is None:
        raise SubmitError(f"job {submission_id}: no such job on this cluster")
    code = exit_code(info) if str(info.status) in ENDED else EXIT_OK
    message = f": {' '.join(str(info.message).split())[:300]}" if info.message else ""
    ended = f", exit {code}" if str(info.status) in ENDED else ""
    print(f"sors submit: job {submission_id} {info.status}{ended}{message}", file=sys.stderr)
    return code


def _sweep_job(args, argv: list[str]) -> tuple[str, list[str]]:
    """(name for the submission id, entry point) of ``sors submit PRESET ...``, the sweep validated here."""
    if not args.preset:
        raise SubmitError("a preset is required (or --status ID / --stop ID, or -- sors COMMAND ...)")
    if args.ray_address:
        raise SubmitError("--ray-address: the job joins the cluster it is submitted to; use --address http://HOST:8265")
    sweep = presets.build_sweep(args.preset, cliutil.overrides(args), sweep_name=args.name)
    return sweep.name, sweep_command(forwarded(argv))


def submit(args, argv: list[str], command: list[str] | None = None) -> int:
    """Submit the sweep (validated here: one line, nothing submitted on bad input) or ``command`` (the
    words after ``--``), then follow it unless --no-wait."""
    if command:
        if command[0] != "sors" or len(command) < 2:
            raise SubmitError(f"after --: a sors command (sors nightly ...), not {redact(shlex.join(command))[:100]}")
        name = command[1]
    else:
        name, command = _sweep_job(args, argv)
    jobs = client(args.address)
    submission_id = args.submission_id or free_submission_id(jobs, base_submission_id(name, command))
    runtime_env = {"working_dir": args.working_dir} if args.working_dir else None
    try:
        jobs.submit_job(
            entrypoint=shlex.join(command),
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={"sors.job": name},
        )
    except Exception as err:  # noqa: BLE001 -- the API's refusal, in one line
        raise SubmitError(f"submitting {submission_id}: {_first_line(err)}") from None
    print(f"sors submit: submitted {submission_id}: {shlex.join(command)}", file=sys.stderr)
    if args.no_wait:
        print(submission_id)
        return EXIT_OK
    try:
        return follow(jobs, submission_id)
    except KeyboardInterrupt:
        print(
            f"sors submit: stopped following; the job runs on -- `sors submit --status {submission_id}`, "
            f"`sors submit --stop {submission_id}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """``sors submit ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1 :] if "--" in argv else None
    argv = argv[: argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if not exit_.code else EXIT_BAD_INPUT
    try:
        if not args.address:
            raise SubmitError(f"--address http://HOST:8265 is required (or set ${ADDRESS_ENV})")
        if args.status or args.stop:
            jobs = client(args.address)
            if args.stop:
                info = _job_info(jobs, args.stop)
                if info is None:
                    raise SubmitError(f"job {args.stop}: no such job on this cluster")
                jobs.stop_job(args.stop)
                print(f"sors submit: stop requested for {args.stop} (was {info.status})", file=sys.stderr)
                return EXIT_OK
            return _report(args.status, _job_info(jobs, args.status))
        return submit(args, argv, command)
    except SubmitError as err:
        print(f"sors submit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 -- ConfigError of the sweep, an API error: one line
        print(f"sors submit: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
