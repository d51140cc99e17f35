"""One nightly run and the ``sors nightly`` command line (see ``pipeline.nightly`` for the layout)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline import cliutil
from pipeline.nightly.compare import Thresholds, compare, self_baseline, summarize
from pipeline.nightly.config import LAST_ACCEPTED, NightlyConfig, NightlyError, load_config
from pipeline.nightly.report import _pct, cell_name, headline, write_reports
from pipeline.nightly.store import (
    EXIT_COULD_NOT_RUN,
    EXIT_OK,
    EXIT_REGRESSION,
    REPORT_JSON,
    REPORT_MD,
    RUN_JSON,
    accept,
    find_run,
    new_run_id,
    nightly_root,
    read_baseline,
    read_run,
    run_dir,
    seed_reused_models,
    write_json,
)
from pipeline.nightly.tracked import alias_night, log_night, move_baseline, night_parent
from pipeline.redact import redact
from pipeline.store import records, results
from pipeline.tracking import runs as tracking
from pipeline.tracking import sync
from sors import data as data_lib
from sors.errors import ConfigError

log = logging.getLogger("pipeline.nightly")
DESCRIPTION = "``sors nightly``: the scheduled robustness regression."


@dataclass
class RunContext:
    """Paths and identities of one nightly run."""

    cfg: NightlyConfig
    results_dir: Path
    root: Path
    run_id: str
    folder: Path
    tracking_uri: str
    code_version: str
    experiment_id: str | None = None


def _baseline(
    cfg: NightlyConfig, root: Path, results_dir: Path, pinned: str | None, tracking_uri: str | None = None
) -> tuple[str | None, str | None]:
    """(baseline run id, how it was chosen) -- pinned by --baseline / nightly.baseline, else the night
    whose model versions alias ``baseline`` points at in the registry at ``tracking_uri`` (when given
    and reachable), else the accepted one of ``baseline.json``."""
    choice = pinned or (cfg.settings.baseline if cfg.settings.baseline != LAST_ACCEPTED else None)
    if choice:
        folder = find_run(results_dir, choice)
        run = read_run(folder)
        if run.get("name") != cfg.name:
            raise ConfigError("baseline", f"run {choice} belongs to nightly {run.get('name')!r}, not {cfg.name!r}")
        if run.get("exit_code") not in (EXIT_OK, EXIT_REGRESSION):
            raise ConfigError("baseline", f"pinned run {choice} did not finish its evaluation")
        return choice, "pinned"
    pointer = read_baseline(root)
    if pointer is None:
        return None, None
    aliased = _alias_baseline(root, tracking_uri, pointer["run_id"]) if tracking_uri else None
    if aliased and aliased != pointer["run_id"]:
        return aliased, "registry alias baseline (moved since baseline.json was written)"
    try:
        find_run(results_dir, pointer["run_id"])
    except ConfigError:
        raise ConfigError(
            "baseline",
            f"the accepted baseline run {pointer['run_id']} of nightly {cfg.name} is gone from {root / 'runs'}",
            "accept another run with `sors nightly --accept RUN`",
        ) from None
    return pointer["run_id"], f"accepted {pointer.get('accepted_at', '')} via {pointer.get('how', '?')}".strip()


def _alias_baseline(root: Path, tracking_uri: str, accepted: str) -> str | None:
    """The night alias ``baseline`` points at (accepted nights first, newest first), None when MLflow
    cannot say (unreachable, or no model has the alias)."""
    log_path = root / "accepted.jsonl"
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    nights = [json.loads(line)["run_id"] for line in reversed(lines) if line.strip()] + [accepted]
    others = sorted((f.name.split("=", 1)[1] for f in root.glob("runs/run_date=*/run_id=*")), reverse=True)
    candidates = list(dict.fromkeys(nights + others))
    try:
        return alias_night(tracking_uri, root, candidates)
    except Exception as err:  # noqa: BLE001 -- the JSON pointer is the cache for exactly this case
        log.warning("could not read the registry alias baseline (using baseline.json): %s", cliutil.tracking_line(err))
        return None


def _check_data(cfg: NightlyConfig, data_root: str | None) -> None:
    """Load one test image of every data set before starting Ray: a missing data set fails in seconds."""
    for name, root in {(t.config.data.name, data_root or t.config.data.root) for t in cfg.sweep.trials}:
        data_lib.load(name, "test", root, n=1)


def _update_run(ctx: RunContext, **fields) -> dict:
    path = ctx.folder / RUN_JSON
    run = json.loads(path.read_text()) if path.is_file() else {}
    run.update(fields)
    write_json(path, run)
    return run


def _night_run(ctx: RunContext) -> tuple[str | None, str | None]:
    """(experiment id, the night's parent run id), both None when MLflow cannot be reached now."""
    try:
        experiment = tracking.ensure_experiment(
            ctx.tracking_uri, ctx.cfg.sweep.name, str(ctx.results_dir / "mlartifacts")
        )
        return experiment, night_parent(ctx.tracking_uri, experiment, ctx.cfg.name, ctx.run_id, ctx.code_version)
    except Exception as err:  # noqa: BLE001 -- the night runs untracked; `sors sync` backfills its runs
        log.warning("MLflow unreachable, the nightly continues untracked: %s", cliutil.tracking_line(err))
        return None, None


def _accept(results_dir: Path | str, run_id: str, tracking_uri: str, how: str = "--accept", strict: bool = True):
    """Move alias ``baseline`` to the night's model versions, then the JSON pointer (its cache).
    Returns what :func:`accept` returns. A night whose models MLflow never registered moves the
    pointer only (with a warning); so does an unreachable MLflow when not ``strict``."""
    try:
        versions = move_baseline(tracking_uri, find_run(results_dir, run_id))
    except Exception as err:  # noqa: BLE001 -- strict (--accept): the caller says "could not run", nothing moved
        if strict:
            raise
        log.warning("could not move the registry alias baseline: %s", cliutil.tracking_line(err))
        versions = {"unreachable": ""}
    if not versions:
        log.warning(
            "run %s has no registered model versions (run `sors sync` on its folder): only "
            "baseline.json moved, not the registry alias",
            run_id,
        )
    return accept(results_dir, run_id, how=how)


def run_nightly(cfg: NightlyConfig, args: argparse.Namespace) -> int:
    """One nightly run (Ray connected or connectable through ``args``). Returns the exit code."""
    results_dir = Path(args.results_dir).resolve()
    root = nightly_root(results_dir, cfg.name)
    uri = args.tracking_uri or tracking.default_tracking_uri(results_dir)
    baseline_id, baseline_how = _baseline(cfg, root, results_dir, args.baseline, uri)
    _check_data(cfg, args.data_root)  # before importing Ray: a missing data set fails in seconds
    # Ray is a heavy import (seconds): only once the inputs are known to be there
    from pipeline import sweep as sweep_lib

    run_id = new_run_id()
    folder = run_dir(root, run_id)
    ctx = RunContext(
        cfg=cfg,
        results_dir=results_dir,
        root=root,
        run_id=run_id,
        folder=folder,
        tracking_uri=uri,
        code_version=tracking.code_version(),
    )
    started = datetime.now(timezone.utc)
    _update_run(
        ctx,
        run_id=run_id,
        name=cfg.name,
        config_path=str(cfg.path.resolve()),
        status="running",
        exit_code=None,
        started_at=started.isoformat(timespec="seconds"),
        code_version=ctx.code_version,
        baseline_run_id=baseline_id,
        overrides=list(args.overrides),
        pid=os.getpid(),
    )
    print(f"sors nightly {cfg.name}: run {run_id}, baseline {baseline_id or 'none yet'}", flush=True)
    try:
        models = seed_reused_models(cfg, root, folder, ctx.code_version, run_id)
        storage = f"{args.storage_path.rstrip('/')}/nightly/{cfg.name}/{run_id}" if args.storage_path else None
        ctx.experiment_id, parent = _night_run(ctx)
        opts = sweep_lib.SweepOptions(
            results_dir=str(folder),
            storage_path=storage,
            tracking_uri=ctx.tracking_uri,
            data_root=args.data_root,
            progress=not args.no_progress and sys.stderr.isatty(),
            parent_run_id=parent,
        )
        connected_here = cliutil.connect(args)
        try:
            summary_run = sweep_lib.run_sweep(cfg.sweep, opts)
        finally:
            cliutil.shutdown(connected_here)
        for record in summary_run.records:  # first training run of a model, for later reuse messages
            if record and not record.nightly_origin:
                records.save_record(str(folder), dataclasses.replace(record, nightly_origin=run_id))
        current = summary_run.rows
        th = Thresholds.from_settings(cfg.settings)
        if baseline_id:
            base_rows = results.read_rows(run_dir(root, baseline_id) / "cells")
            lines = compare(base_rows, current, th)
        else:
            lines = self_baseline(current)
    except BaseException as err:
        _record_failure(ctx, err, started)
        raise NightlyError(_one_line(err)) from err
    missed = sync.pending(folder, cfg.sweep.name)
    summary = summarize(lines, tracking_missed=len(missed))
    meta = {
        "name": cfg.name,
        "run_id": run_id,
        "run_date": started.date().isoformat(),
        "config_path": str(cfg.path),
        "overrides": list(args.overrides),
        "code_version": ctx.code_version,
        "baseline_run_id": baseline_id,
        "baseline_how": baseline_how,
        "self_accepted": baseline_id is None,
        "models": models,
        "tracking_uri": redact(ctx.tracking_uri),
        "cells_store": str(folder / "cells"),
        "thresholds": {
            "min_drop_points": cfg.settings.min_drop,
            "clean_min_drop_points": cfg.settings.clean_min_drop,
            "fail_on_new_warnings": th.fail_on_new_warnings,
            "alpha": th.alpha,
        },
        "exit_code": summary["exit_code"],
        "seconds": round(time.time() - started.timestamp(), 1),
    }
    files = write_reports(folder, meta, lines, summary)
    status = summary["status"]
    mlflow_run = log_night(ctx.tracking_uri, parent, ctx.experiment_id, root, folder, meta, summary, files, status)
    _update_run(
        ctx,
        status=status,
        exit_code=summary["exit_code"],
        mlflow_run_id=mlflow_run,
        summary=summary,
        models=models,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if baseline_id is None:
        _accept(results_dir, run_id, ctx.tracking_uri, how="first run (no baseline yet)", strict=False)
    _print_summary(meta, lines, summary, files)
    if missed:
        print(sync.failure_message("nightly", missed, str(folder), ctx.tracking_uri, cfg.sweep.name), file=sys.stderr)
    return summary["exit_code"]


def _record_failure(ctx: RunContext, err: BaseException, started: datetime) -> None:
    """A run that could not finish still leaves run.json and a report saying why."""
    reason = _one_line(err)
    meta = {
        "name": ctx.cfg.name,
        "run_id": ctx.run_id,
        "run_date": started.date().isoformat(),
        "config_path": str(ctx.cfg.path),
        "code_version": ctx.code_version,
        "exit_code": EXIT_COULD_NOT_RUN,
        "reason": reason,
    }
    ctx.folder.mkdir(parents=True, exist_ok=True)
    (ctx.folder / REPORT_MD).write_text(f"# Nightly {ctx.cfg.name} — run {ctx.run_id}\n\n**could not run**: {reason}\n")
    write_json(
        ctx.folder / REPORT_JSON, {"meta": meta, "summary": None, "headline": f"could not run: {reason}", "cells": []}
    )
    _update_run(
        ctx,
        status="error",
        exit_code=EXIT_COULD_NOT_RUN,
        reason=reason,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _print_summary(meta: dict, lines: list[dict], summary: dict, files: list[Path]) -> None:
    for line in lines:
        if line["fails"]:
            delta = "" if line["delta_points"] is None else f" ({line['delta_points']:+.1f} points)"
            print(
                f"  {line['verdict']:12s} {cell_name(line)}: {_pct(line['baseline'])} -> {_pct(line['current'])}{delta}"
            )
    print(f"report: {files[0]}")
    print(f"sors nightly: exit {summary['exit_code']}: {headline(meta, summary)}", flush=True)


def _one_line(err: BaseException) -> str:
    """The reason a run failed, as one line (see :func:`pipeline.cliutil.one_line`)."""
    return cliutil.one_line(err, plain=(NightlyError,))


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """``sors nightly`` options: --config or --accept, --baseline, and the CLI's shared options."""
    parser = cliutil.OneLineArgumentParser(
        prog="sors nightly",
        description=DESCRIPTION,
        epilog="exit codes: 0 no regression, 1 regression, 2 could not run",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="nightly YAML (e.g. infra/nightly/smoke.yaml)")
    what.add_argument("--accept", metavar="RUN", help="make run RUN the baseline of its nightly and exit")
    parser.add_argument(
        "--baseline",
        metavar="RUN",
        default=None,
        help="compare against this run instead of the accepted baseline (pinned)",
    )
    cliutil.add_common(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``sors nightly ...``; returns the exit code (0 no regression, 1 regression, 2 could not run)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code == 0 else EXIT_COULD_NOT_RUN
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.accept:
            uri = args.tracking_uri or tracking.default_tracking_uri(Path(args.results_dir).resolve())
            pointer, previous = _accept(args.results_dir, args.accept, uri)
            name = read_run(find_run(args.results_dir, args.accept))["name"]
            was = f" (was {previous['run_id']})" if previous else ""
            print(f"sors nightly: run {pointer['run_id']} is now the baseline of nightly {name}{was}")
            return EXIT_OK
        overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
        cfg = load_config(args.config, overrides)
        return run_nightly(cfg, args)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 -- every failure is "could not run", one line
        print(f"sors nightly: exit 2: could not run: {_one_line(err)}", file=sys.stderr, flush=True)
        if args.verbose:
            log.exception("details")
        return EXIT_COULD_NOT_RUN
