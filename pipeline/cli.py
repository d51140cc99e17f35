"""The ``sors`` command line: train, sweep, evaluate, report (nightly and bench: other modules).

Exit codes (``pipeline.cliutil``): 0 done; 1 a regression or failed check (nightly, bench); 2 bad input
or could not run (one line naming the problem, no traceback); 130 interrupted (the sweep is resumable
with --resume).

Each command imports the modules it runs inside its function: they load torch, pyarrow and Ray
(seconds each), and ``sors --help`` or a usage error should answer at once. Those function-level
imports are marked ``# heavy``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from pipeline import cliutil
from pipeline.cliutil import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    OneLineArgumentParser,
    add_common,
    connect,
    shutdown,
)
from pipeline.redact import install as install_redaction
from pipeline.redact import redact
from pipeline.store.records import load_records, record_path, save_record
from pipeline.tracking import runs as tracking
from sors import config as config_lib
from sors.errors import ConfigError, DataNotFoundError, TrainingDiverged
from tasks import storage

MESSAGE_LIMIT = 600  # characters of an error line: one line on any terminal log, never a 100 KB echo


class UsageError(Exception):
    """Bad command-line input that argparse cannot see (one line)."""


DRY_RUN_HELP = (
    "check every input (config, data, folders, tracking, Ray address), print the trials and what "
    "each model would allocate, run nothing"
)
ALLOW_LARGE_HELP = "run models over 2 GiB of weights or 64 ensemble members (refused by default)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands train, sweep, evaluate, report, nightly, bench)."""
    parser = OneLineArgumentParser(prog="sors", description="SORS robustness pipeline: Ray Train/Tune, Parquet, MLflow")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one model (Ray Train) and log it to MLflow")
    train.add_argument("--name", default=None, help="run name (default: the model name)")
    train.add_argument("--help-keys", action="store_true", help="list every config key and exit")
    train.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    train.add_argument("--allow-large", action="store_true", help=ALLOW_LARGE_HELP)
    add_common(train)

    sweep = sub.add_parser("sweep", help="run a preset: Tune grid of trainings, evaluation cells, report")
    cliutil.add_sweep_flags(sweep, DRY_RUN_HELP, ALLOW_LARGE_HELP)
    add_common(sweep)

    evaluate = sub.add_parser("evaluate", help="evaluate checkpoints: one Ray task per cell into Parquet")
    evaluate.add_argument("checkpoints", nargs="+", help="checkpoint files or URIs")
    evaluate.add_argument("--label", action="append", default=[], help="row name per checkpoint (default: file name)")
    evaluate.add_argument("--preset", default=None, help="take the evaluation plan (attacks, eps, seeds) from a preset")
    evaluate.add_argument("--name", default="evaluate", help="sweep name recorded in the rows / MLflow experiment")
    evaluate.add_argument("--allow-large", action="store_true", help=ALLOW_LARGE_HELP)
    add_common(evaluate)

    report = sub.add_parser("report", help="tables (Markdown, CSV) and plots from the Parquet results")
    report.add_argument("sweep", nargs="?", help="only this sweep (default: every row)")
    report.add_argument("--out", default=None, help="output folder (default <results>/reports/<sweep>)")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    add_common(report)

    for name, text in (
        ("nightly", "scheduled robustness regression against the accepted baseline"),
        ("bench", "benchmarks"),
        ("sync", "backfill MLflow runs from the results folder after a tracking outage"),
        ("submit", "run a sweep as a Ray job on a cluster (Jobs API); --status / --stop a job"),
    ):
        extra = sub.add_parser(name, help=text)
        extra.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# ---------------------------------------------------------------- helpers


def _options(args, resume: bool = False):
    from pipeline.sweep import SweepOptions  # heavy

    return SweepOptions(
        results_dir=args.results_dir,
        storage_path=args.storage_path,
        tracking_uri=args.tracking_uri,
        data_root=args.data_root,
        resume=resume,
        progress=not args.no_progress,
        max_concurrent_trials=getattr(args, "max_concurrent_trials", None),
    )


def _preflight(args, opts, sweep=None, configs=()) -> None:
    """Check every input before anything is written or launched (PreflightError: one line).
    ``configs``: run configs (or ``(where, config)`` pairs) whose model sizes are bounded and whose data
    sets must be readable (a sweep's trials are added)."""
    from pipeline import preflight  # heavy

    named = [c if isinstance(c, tuple) else (f"config {i + 1}", c) for i, c in enumerate(configs)]
    named += [(f"trial {t.name}", t.config) for t in (sweep.trials if sweep else ())]
    for where, cfg in named:
        preflight.check_model_size(cfg, where, getattr(args, "allow_large", False))
    configs = [c for _, c in named]
    datasets = {(c.data.name, opts.data_root or c.data.root) for c in configs}
    preflight.check_inputs(
        opts.results_dir, args.storage_path, opts.tracking_uri, args.ray_address, args.num_cpus, datasets
    )
    preflight.check_store(opts.store)
    if sweep is not None:
        preflight.check_checkpoints(sweep, opts)


def _dry_run(sweep) -> None:
    """Print what a sweep would run: each trial with the options that differ from the defaults."""
    from pipeline import preflight  # heavy
    from pipeline.plan import presets  # heavy

    defaults = config_lib.flat_dict(config_lib.RunConfig())
    cells = sum(
        len(sweep.evaluation.cells(presets.is_randomized_arch(t.config.model.name)))
        * len(sweep.evaluation.seeds)
        * len(t.evaluated())
        for t in sweep.trials
    )

    print(f"sweep {sweep.name}: {len(sweep.trials)} trial(s), {cells} evaluation cell(s); inputs OK, nothing run")
    for trial in sweep.trials:
        changed = {k: v for k, v in config_lib.flat_dict(trial.config).items() if v != defaults.get(k)}
        options = " ".join(f"{k}={redact(v)}" for k, v in sorted(changed.items()))
        size = preflight.check_model_size(trial.config, trial.name, allow_large=True)  # checked in _preflight
        print(f"  {trial.name} ({trial.label}) config {config_lib.config_hash(trial.config)[:8]} [{size}]: {options}")


def _tracking_outcome(command: str, opts, sweep_name: str) -> int:
    """Exit code after a finished run: 0, or 1 with one line on stderr when MLflow missed something."""
    from pipeline.tracking import sync  # heavy

    missed = sync.pending(opts.results_dir, sweep_name)
    if not missed:
        return EXIT_OK
    print(sync.failure_message(command, missed, opts.results_dir, opts.tracking_uri, sweep_name), file=sys.stderr)
    return EXIT_CHECK_FAILED


def _publish_report(
    sweep_name: str,
    rows: list[dict],
    records: list[dict],
    opts,
    log_mlflow: bool = True,
    out_dir: str | None = None,
    parent_run_id: str | None = None,
) -> tuple[list[Path], str]:
    """Write the report files and log them to the sweep's parent run (found or created when not given).
    Returns (files, console table)."""
    from pipeline import report  # heavy
    from pipeline.tracking import sync  # heavy

    order = report.model_order(records)
    out = Path(out_dir) if out_dir else Path(opts.results_dir) / "reports" / sweep_name
    files = report.write_report(rows, records, out, title=f"sweep {sweep_name}", model_order=order)
    # a sweep whose tracking already failed gets its report from `sors sync` (no second timeout here)
    failed = any((r.get("tracking") or {}).get("status") == sync.INCOMPLETE for r in records if r)
    if log_mlflow and records and not failed:
        try:
            if parent_run_id is None:
                experiment = tracking.ensure_experiment(opts.tracking_uri, sweep_name, opts.artifact_root)
                parent_run_id = sync.sweep_parent(opts.tracking_uri, experiment, sweep_name)
            sync.upload_report(opts.tracking_uri, opts.results_dir, sweep_name, parent_run_id, files)
        except Exception as err:  # noqa: BLE001 -- the report exists on disk either way
            logging.getLogger("pipeline.cli").warning(
                "could not log the report to MLflow: %s", cliutil.tracking_line(err)
            )
            for record in records:
                if record and record.get("trial") and Path(opts.results_dir, "models", record["sweep"]).is_dir():
                    sync.mark(opts.results_dir, record, sync.INCOMPLETE, cliutil.tracking_line(err), opts.tracking_uri)
    return files, report.console_report(rows, order, title=f"sweep {sweep_name}")


# ---------------------------------------------------------------- commands


def _checked_run(args, opts, sweep):
    """Preflight (exits 2 on bad input), then either the dry-run plan (returns None: nothing ran) or
    the sweep on the cluster named by ``--address`` (returns its summary); Ray is shut down
    afterwards if we started it."""
    from pipeline.sweep import run_sweep  # heavy

    _preflight(args, opts, sweep)
    if args.dry_run:
        _dry_run(sweep)
        return None
    started = connect(args)
    try:
        return run_sweep(sweep, opts)
    finally:
        shutdown(started)


def cmd_train(args) -> int:
    from pipeline.plan import presets  # heavy

    if args.help_keys:
        print("\n".join(config_lib.all_keys()))
        return EXIT_OK
    sweep = presets.single_trial_sweep(cliutil.overrides(args), trial_name=args.name)
    opts = _options(args).resolved()
    summary = _checked_run(args, opts, sweep)
    if summary is None:  # a dry run: inputs checked, plan printed
        return EXIT_OK
    record = summary.records[0]
    last = (record.get("history") or [{}])[-1]
    print(f"trained {record['trial']}: {record['epochs']} epochs, clean_acc {last.get('clean_acc', float('nan')):.4f}")
    print(f"checkpoint: {redact(record['checkpoint_uri'])}")
    print(f"mlflow run: {record['mlflow_run_id']}")
    return _tracking_outcome("train", opts, sweep.name)


def cmd_sweep(args) -> int:
    from pipeline.plan import evaluation_plan, presets  # heavy

    if args.list or not args.preset:
        for name in presets.available():
            print(f"{name:10s} {presets.load_raw(name).get('description', '')}")
        print("\nattacks (attack.name) and the options each takes (--set attack.<option>=...), with defaults:")
        print("\n".join(f"  {line}" for line in evaluation_plan.attack_lines()))
        return EXIT_OK if args.list else EXIT_BAD_INPUT
    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise UsageError(f"--max-concurrent-trials {args.max_concurrent_trials}: must be at least 1")
    sweep = presets.build_sweep(args.preset, cliutil.overrides(args), sweep_name=args.name)
    opts = _options(args, resume=args.resume).resolved()
    summary = _checked_run(args, opts, sweep)
    if summary is None:  # a dry run: inputs checked, plan printed
        return EXIT_OK
    files, table = _publish_report(sweep.name, summary.rows, summary.records, opts, parent_run_id=summary.parent_run_id)
    print(table)
    print(
        f"\nsweep {sweep.name}: {summary.trials_run} trial(s) run, {summary.trials_skipped} already done, "
        f"{summary.cells_submitted} new cell(s), {len(summary.rows)} row(s), {summary.seconds:.0f} s"
    )
    print(f"results: {opts.store}  report: {files[0].parent}  mlflow: {redact(opts.tracking_uri)}")
    return _tracking_outcome("sweep", opts, sweep.name)


def cmd_evaluate(args) -> int:
    import dataclasses

    from pipeline.cluster import fanout  # heavy
    from pipeline.plan import overrides as overrides_lib  # heavy
    from pipeline.plan import presets  # heavy
    from pipeline.plan.cell_specs import cell_specs, check_sources  # heavy
    from pipeline.store import results  # heavy
    from sors import train as train_lib  # heavy

    presets.check_component("--name", args.name)
    if args.label and len(args.label) != len(args.checkpoints):
        raise UsageError(f"--label given {len(args.label)} time(s) for {len(args.checkpoints)} checkpoint(s)")
    eval_overrides, _ = overrides_lib.evaluate_overrides(args.overrides)  # ConfigError before any file is read
    opts = _options(args).resolved()
    models = []
    for i, uri in enumerate(args.checkpoints):
        label = args.label[i] if args.label else Path(uri).stem if Path(uri).stem != "model" else Path(uri).parent.name
        presets.check_component("--label" if args.label else f"label of {uri} (set --label)", label)
        local = storage.local_copy(uri)
        payload = train_lib.read_checkpoint(local)  # CheckpointError: one line naming the file
        cfg = train_lib.checkpoint_config(local, payload)  # and a config that resolves, with a known model
        models.append((uri, local, cfg, label))
    plans = {
        cfg.data.name: presets.evaluate_plan(args.preset, args.overrides, cfg.data.name) for _, _, cfg, _ in models
    }
    check_sources(plans.values())
    _preflight(args, opts, configs=[(redact(m[0]), m[2]) for m in models])
    specs, records = [], []
    code = tracking.code_version()
    experiment = tracking.ensure_experiment(opts.tracking_uri, args.name, opts.artifact_root)
    for uri, local, cfg, label in models:
        eval_cfg = config_lib.resolve(config_lib.apply_overrides(cfg, eval_overrides)).eval
        plan = plans[cfg.data.name]
        sha = storage.file_sha256(local)
        run_id = tracking.find_or_create_run(
            opts.tracking_uri,
            experiment,
            label,
            sha[:16],
            config_lib.flat_dict(cfg),
            {tracking.TAG_SWEEP: args.name, tracking.TAG_CODE: code},
        )
        # the sweep's cell builder: one trial of this checkpoint as trained (no variants), its eval settings
        trial = presets.TrialSpec(name=label, label=label, config=dataclasses.replace(cfg, eval=eval_cfg))
        record = {"checkpoint_uri": uri, "checkpoint_sha256": sha, "mlflow_run_id": run_id}
        specs += cell_specs(trial, record, plan, args.name, code, args.data_root)
        records.append(
            {
                "sweep": args.name,
                "trial": label,
                "label": label,
                "checkpoint_uri": uri,
                "checkpoint_sha256": sha,
                "mlflow_run_id": run_id,
                "config": config_lib.to_dict(cfg),
                "config_hash": config_lib.config_hash(cfg),
                "variants": [],
                "evaluated": True,
                "history": payload.get("history", []),
            }
        )
    started = connect(args)
    try:
        from tqdm.auto import tqdm

        todo = sum(not results.is_done(opts.store, s) for s in specs)
        with tqdm(
            total=len(specs), initial=len(specs) - todo, desc="cells", unit="cell", disable=args.no_progress
        ) as bar:
            summary = fanout.run_cells(specs, opts.store, on_done=lambda row: bar.update(1))
    finally:
        shutdown(started)
    untracked = None
    for record in records:
        rows = [r for r in summary.rows if r["mlflow_run_id"] == record["mlflow_run_id"]]
        try:
            tracking.log_eval_rows(opts.tracking_uri, record["mlflow_run_id"], rows)
        except Exception as err:  # noqa: BLE001 -- the rows are in Parquet; rerunning logs them
            untracked = cliutil.tracking_line(err)
        if not record_path(opts.results_dir, args.name, record["trial"]).exists():
            save_record(opts.results_dir, record)
    from pipeline import report  # heavy

    print(report.console_report(summary.rows, [m[3] for m in models], title=f"evaluate ({len(summary.rows)} cells)"))
    if summary.failures:
        where, why = summary.failures[0]
        raise UsageError(f"{len(summary.failures)} cell(s) failed; first: {where}: {why}")
    if untracked:
        print(
            f"sors evaluate: tracking failed: metrics not logged to MLflow at {redact(opts.tracking_uri)} "
            f"({untracked}); the cells are in {opts.store} -- rerun the same command once the server is back "
            "(finished cells are not recomputed)",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    return EXIT_OK


def cmd_report(args) -> int:
    from pipeline import preflight  # heavy
    from pipeline.store import results  # heavy

    opts = _options(args).resolved()
    preflight.check_store(opts.store)  # a truncated cell: one line naming it, before anything is written
    rows = results.read_rows(opts.store, sweep=args.sweep)
    records = load_records(opts.results_dir, args.sweep) if args.sweep else []
    rows += results.rows_of_records(opts.store, records, skip={r["cell_id"] for r in rows})  # stored first elsewhere
    if not rows:
        raise UsageError(f"no results{' for sweep ' + args.sweep if args.sweep else ''} under {opts.store}")
    files, table = _publish_report(
        args.sweep or "all", rows, records, opts, log_mlflow=not args.no_mlflow, out_dir=args.out
    )
    print(table)
    print("\nwrote " + ", ".join(str(f) for f in files))
    return EXIT_OK


def _nightly(argv: list[str]) -> int:
    from pipeline.nightly import run as nightly_run  # heavy

    return nightly_run.main(argv)


def _bench(argv: list[str]) -> int:
    from bench import cli as bench_cli  # heavy

    return bench_cli.main(argv)


def _sync(argv: list[str]) -> int:
    from pipeline.tracking import sync  # heavy

    return sync.main(argv)


def _submit(argv: list[str]) -> int:
    from pipeline.cluster import submit  # heavy

    return submit.main(argv)


# Commands with a parser of their own: ``sors nightly|bench|sync|submit ARGS`` runs ``main(ARGS)`` there.
DELEGATED = {"nightly": _nightly, "bench": _bench, "sync": _sync, "submit": _submit}


def _delegate(args) -> int:
    """Run the delegated command's ``main(args.args)``; returns its exit code."""
    return int(DELEGATED[args.command](list(args.args)) or 0)


COMMANDS = {
    "train": cmd_train,
    "sweep": cmd_sweep,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "nightly": _delegate,
    "bench": _delegate,
    "sync": _delegate,
    "submit": _delegate,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.preflight import PreflightError  # heavy
    from pipeline.store.results import ResultsError  # heavy
    from pipeline.sweep import SweepError  # heavy
    from sors.train import CheckpointError  # heavy

    return (ConfigError, DataNotFoundError, CheckpointError, SweepError, UsageError, PreflightError, ResultsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    install_redaction()  # every log line and print of this process: URI passwords masked
    if argv and argv[0] in DELEGATED:  # their options belong to the other module's parser
        return _delegate(argparse.Namespace(command=argv[0], args=argv[1:]))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error, already printed on one line (2)
        return EXIT_OK if not exit_.code else EXIT_BAD_INPUT
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    install_redaction()  # again: the filter on the handler basicConfig added
    if not verbose:  # MLflow announces the schema set-up of a new SQLite store at INFO
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from pipeline.sweep import SweepInterrupted  # heavy

    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        message = redact(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
        diverged = isinstance(getattr(err, "cause", None), TrainingDiverged)
        if diverged:
            message += " -- no model record or final checkpoint was written; the MLflow run is marked FAILED"
        print(f"sors {args.command}: error: {message[:MESSAGE_LIMIT]}", file=sys.stderr)
        return EXIT_CHECK_FAILED if diverged else EXIT_BAD_INPUT
    except (KeyboardInterrupt, SweepInterrupted) as err:
        hint = f"sors sweep {args.preset} --resume" if args.command == "sweep" and args.preset else "the same command"
        detail = f" ({err})" if str(err) else ""
        print(
            f"sors {args.command}: interrupted{detail}; finished work is kept -- continue with `{hint}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
