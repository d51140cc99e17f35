"""``sors nightly``: the scheduled robustness regression.

One nightly run trains the configured reference models -- or reuses a model whose resolved config
hash and code version are unchanged -- evaluates the fixed attack suite through the sweep's Ray
fan-out, and compares every cell with the accepted baseline run::

    sors nightly --config infra/nightly/smoke.yaml        # exit 0 no regression, 1 regression (or runs MLflow missed), 2 could not run
    sors nightly --accept 20250102T020000Z-3f9a           # promote a run to the baseline of its nightly

A cell *regresses* when its accuracy drops by more than ``min_drop`` points AND the drop is
outside both 95% intervals (current accuracy below the baseline's interval, baseline accuracy above
the current interval). Clean-accuracy cells use ``clean_min_drop``; a sanity-check warning the
baseline cell did not have is flagged too. The first run of a nightly, with no baseline, accepts
itself and says so.

Config: a preset-format YAML (``name``, ``base``, ``trials``, ``evaluation``; or ``preset: NAME`` to
reference a shipped preset) plus a ``nightly:`` section with :class:`Settings`.

Layout under ``<results>/nightly/<name>/`` (plain files, meant to be read)::

    baseline.json                                 the accepted run: {"run_id", "accepted_at", "how"}
    accepted.jsonl                                every acceptance, one JSON line each
    runs/run_date=YYYY-MM-DD/run_id=<id>/
        run.json                                  status, exit code, reason, code version, baseline
        nightly-report.md, nightly-report.json    every cell: baseline, current, delta, verdict
        cells/dataset=*/attack=*/<cell>.parquet   this run's rows (pipeline.results layout)
        models/nightly-<name>/<trial>.json        model records (a reused one points at its first run)
        ray/                                      Ray Train checkpoints and Tune state of this run

so ``read_parquet('<results>/nightly/<name>/runs/*/*/cells/*/*/*.parquet', hive_partitioning=true)``
(DuckDB) sees ``run_date``, ``run_id``, ``dataset`` and ``attack`` columns. MLflow: the trial runs
live in experiment ``nightly-<name>``; each nightly adds a run there tagged ``nightly=true`` with the
counts as metrics and the report files as artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from sors import config as config_lib
from sors.errors import ConfigError

log = logging.getLogger("pipeline.nightly")
EXIT_OK, EXIT_REGRESSION, EXIT_COULD_NOT_RUN = 0, 1, 2
REPORT_MD, REPORT_JSON, RUN_JSON = "nightly-report.md", "nightly-report.json", "run.json"
LAST_ACCEPTED = "last-accepted"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RUN_ID = re.compile(r"^(\d{8})T\d{6}Z-[0-9a-f]{4}$")


class NightlyError(RuntimeError):
    """The nightly could not run (exit 2); the message is one line saying why."""


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Settings:
    """The ``nightly:`` section. Drops are in accuracy points (percentage points, 2.0 = 2 %)."""
    baseline: str = LAST_ACCEPTED  # or a run id: compare against that run instead (pinned)
    min_drop: float = 2.0  # attacked cells: a regression must lose more than this many points
    clean_min_drop: float = 2.0  # clean-accuracy cells: the same, for a "clean-drop"
    new_warnings: str = "fail"  # a sanity warning the baseline cell lacked: "fail" or "report"

    def check(self) -> "Settings":
        """Validate; returns self (ConfigError names the bad key)."""
        for key in ("min_drop", "clean_min_drop"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
                raise ConfigError(f"nightly.{key}", f"{value!r}", "accuracy points between 0 and 100")
        if self.new_warnings not in ("fail", "report"):
            raise ConfigError("nightly.new_warnings", f"{self.new_warnings!r}", "fail or report")
        if self.baseline != LAST_ACCEPTED and not _RUN_ID.match(str(self.baseline)):
            raise ConfigError("nightly.baseline", f"{self.baseline!r} is not a run id",
                              f"{LAST_ACCEPTED} or a run id such as 20250102T020000Z-3f9a")
        return self


@dataclass(frozen=True)
class NightlyConfig:
    """A resolved nightly: its name, the sweep it runs (trials + evaluation plan) and its settings."""
    name: str
    path: Path
    sweep: Any  # pipeline.presets.Sweep
    settings: Settings


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> NightlyConfig:
    """Read a nightly YAML and resolve its sweep with ``--set`` ``overrides`` (ConfigError on any problem)."""
    from pipeline import presets

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


# ---------------------------------------------------------------- the store: runs and baselines

def nightly_root(results_dir: str | os.PathLike, name: str) -> Path:
    """``<results>/nightly/<name>``: baseline pointer, acceptance log and runs of one nightly."""
    return Path(results_dir) / "nightly" / name


def new_run_id(now: datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-xxxx`` (UTC start time + 4 random hex digits): sortable and unique."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


def run_dir(root: Path, run_id: str) -> Path:
    """Folder of one run, under its run-date partition."""
    match = _RUN_ID.match(run_id)
    if not match:
        raise ConfigError("run", f"{run_id!r} is not a nightly run id", "YYYYmmddTHHMMSSZ-xxxx")
    day = match.group(1)
    return root / "runs" / f"run_date={day[:4]}-{day[4:6]}-{day[6:]}" / f"run_id={run_id}"


def find_run(results_dir: str | os.PathLike, run_id: str) -> Path:
    """The folder of run ``run_id`` in any nightly under ``results_dir`` (ConfigError when unknown)."""
    if not _RUN_ID.match(str(run_id)):
        raise ConfigError("run", f"{run_id!r} is not a nightly run id", "YYYYmmddTHHMMSSZ-xxxx, see `ls <results>/nightly/*/runs/*`")
    hits = sorted(Path(results_dir, "nightly").glob(f"*/runs/run_date=*/run_id={run_id}"))
    if not hits:
        raise ConfigError("run", f"no nightly run {run_id} under {Path(results_dir, 'nightly')}")
    return hits[0]


def read_run(folder: Path) -> dict:
    """The ``run.json`` of a run folder."""
    return json.loads((folder / RUN_JSON).read_text())


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_baseline(root: Path) -> dict | None:
    """The accepted-baseline pointer of a nightly, or None before the first run."""
    path = root / "baseline.json"
    return json.loads(path.read_text()) if path.is_file() else None


def accept(results_dir: str | os.PathLike, run_id: str, how: str = "--accept") -> tuple[dict, dict | None]:
    """Make ``run_id`` the baseline of its nightly. Returns (new pointer, previous pointer or None).

    Only runs that finished their evaluation (exit 0 or 1) can be accepted.
    """
    folder = find_run(results_dir, run_id)
    run = read_run(folder)
    if run.get("exit_code") not in (EXIT_OK, EXIT_REGRESSION):
        raise ConfigError("run", f"run {run_id} did not finish its evaluation ({run.get('status')}: "
                                 f"{run.get('reason') or 'no reason recorded'}); only finished runs can be accepted")
    root = nightly_root(results_dir, run["name"])
    previous = read_baseline(root)
    pointer = {"run_id": run_id, "accepted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "how": how,
               "previous": previous["run_id"] if previous else None}
    _write_json(root / "baseline.json", pointer)
    with open(root / "accepted.jsonl", "a") as handle:
        handle.write(json.dumps(pointer) + "\n")
    return pointer, previous


# ---------------------------------------------------------------- comparison (pure functions over rows)

@dataclass(frozen=True)
class Thresholds:
    """Comparison rule in accuracy fractions (0.02 = 2 points)."""
    min_drop: float = 0.02
    clean_min_drop: float = 0.02
    fail_on_new_warnings: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> "Thresholds":
        """The rule of a config's ``nightly:`` section (points -> fractions)."""
        return cls(settings.min_drop / 100, settings.clean_min_drop / 100, settings.new_warnings == "fail")


def cell_key(row: dict) -> tuple:
    """What makes two runs' cells the same cell: model (variant), data set, attack, eps, steps, EOT samples,
    seed. Not the checkpoint: a retrained model's cells are compared with the old model's."""
    return (row["dataset"], row.get("variant") or row["trial"], row["attack"], round(float(row["eps"]), 6),
            row.get("steps"), row.get("eot_samples"), int(row.get("seed") or 0))


def flag_kind(flag: str) -> str:
    """A sanity flag without its numbers, so the same warning with other numbers is not "new"."""
    return re.sub(r"\d+(\.\d+)?", "#", flag).strip()


def significant_drop(base: dict, cur: dict, min_drop: float) -> bool:
    """Accuracy fell by more than ``min_drop`` and each accuracy lies outside the other's interval."""
    return (base["accuracy"] - cur["accuracy"] > min_drop and cur["accuracy"] < base["ci_low"]
            and base["accuracy"] > cur["ci_high"])


def compare_cell(base: dict | None, cur: dict | None, th: Thresholds) -> dict:
    """One report line: baseline and current accuracy with intervals, delta in points, verdict, and whether
    the verdict fails the nightly. Verdicts: ok, improved, regression, clean-drop, new-warning, new, missing."""
    row = cur or base
    line = {"key": list(cell_key(row)), "model": row.get("model") or row.get("variant"), "variant": row.get("variant"),
            "dataset": row["dataset"], "attack": row["attack"], "eps": float(row["eps"]), "steps": row.get("steps"),
            "eot_samples": row.get("eot_samples"), "seed": int(row.get("seed") or 0),
            "baseline": _side(base), "current": _side(cur), "delta_points": None, "new_warnings": []}
    if base is None:
        return dict(line, verdict="new", fails=False)
    if cur is None:
        return dict(line, verdict="missing", fails=True)
    line["delta_points"] = round(100 * (cur["accuracy"] - base["accuracy"]), 2)
    clean = row["attack"] == "none"
    old_kinds = {flag_kind(f) for f in base.get("sanity_flags") or []}
    line["new_warnings"] = [f for f in cur.get("sanity_flags") or [] if flag_kind(f) not in old_kinds]
    if significant_drop(base, cur, th.clean_min_drop if clean else th.min_drop):
        return dict(line, verdict="clean-drop" if clean else "regression", fails=True)
    if line["new_warnings"]:
        return dict(line, verdict="new-warning", fails=th.fail_on_new_warnings)
    if significant_drop(cur, base, th.clean_min_drop if clean else th.min_drop):
        return dict(line, verdict="improved", fails=False)
    return dict(line, verdict="ok", fails=False)


def _side(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"accuracy": row["accuracy"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "n": row.get("n"),
            "sanity_flags": list(row.get("sanity_flags") or []), "cell_id": row.get("cell_id"),
            "code_version": row.get("code_version"), "checkpoint_sha256": row.get("checkpoint_sha256")}


def compare(baseline_rows: Iterable[dict], current_rows: Iterable[dict], th: Thresholds) -> list[dict]:
    """Every cell of either run, matched by :func:`cell_key`, as report lines (current order, then missing)."""
    base = {cell_key(r): r for r in baseline_rows}
    cur = {cell_key(r): r for r in current_rows}
    keys = sorted(cur, key=_order) + sorted((k for k in base if k not in cur), key=_order)
    return [compare_cell(base.get(k), cur.get(k), th) for k in keys]


def _order(key: tuple) -> tuple:
    dataset, model, attack, eps, steps, eot, seed = key
    return (dataset, model, attack != "none", attack, eps, steps or 0, eot or 0, seed)


def self_baseline(rows: Iterable[dict]) -> list[dict]:
    """Report lines of a first run, which becomes its own baseline (verdict "baseline")."""
    lines = compare(rows, rows, Thresholds())
    return [dict(line, verdict="baseline", fails=False) for line in lines]


def summarize(lines: list[dict], tracking_missed: int = 0) -> dict:
    """Counts per verdict, the failing lines' count, the runs MLflow missed, and the status and exit
    code they imply: "regression" (1), "tracking-incomplete" (1: no regression, but the MLflow record
    people browse lacks runs; ``sors sync`` repairs it from the files on disk), else "passed" (0)."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["verdict"]] = counts.get(line["verdict"], 0) + 1
    failing = sum(1 for line in lines if line["fails"])
    status = "regression" if failing else ("tracking-incomplete" if tracking_missed else "passed")
    return {"cells": len(lines), "failing": failing, "verdicts": counts, "tracking_missed": tracking_missed,
            "status": status, "exit_code": EXIT_OK if status == "passed" else EXIT_REGRESSION}


# ---------------------------------------------------------------- reports

def _pct(side: dict | None) -> str:
    if side is None:
        return "—"
    return f"{100 * side['accuracy']:.1f} [{100 * side['ci_low']:.1f}, {100 * side['ci_high']:.1f}]"


def _attack_text(line: dict) -> str:
    from pipeline.report import eps_text

    if line["attack"] == "none":
        return "clean"
    extra = [f"{line['steps']} steps"] if (line.get("steps") or 0) > 1 else []
    extra += [f"{line['eot_samples']} EOT samples"] if (line.get("eot_samples") or 0) > 1 else []
    return f"{line['attack']} {eps_text(line['eps'])}" + (f" ({', '.join(extra)})" if extra else "")


def cell_name(line: dict) -> str:
    """``SORS pgd 25/255 (2 steps) seed 0``: how a cell is named in reports and messages."""
    return f"{line['model']} {_attack_text(line)}" + (f" seed {line['seed']}" if line["seed"] else "")


def headline(meta: dict, summary: dict) -> str:
    """One line: the verdict of the run."""
    if summary["failing"]:  # a first run compares with itself: it never fails
        return (f"REGRESSION: {summary['failing']} of {summary['cells']} cells against baseline "
                f"{meta['baseline_run_id']}")
    if meta.get("self_accepted"):
        verdict = f"no baseline yet: run {meta['run_id']} accepted itself as the baseline ({summary['cells']} cells)"
    else:
        verdict = f"no regression: {summary['cells']} cells against baseline {meta['baseline_run_id']}"
    if summary.get("tracking_missed"):
        return f"TRACKING INCOMPLETE: {summary['tracking_missed']} run(s) missing from MLflow; {verdict}"
    return verdict


def render_markdown(meta: dict, lines: list[dict], summary: dict) -> str:
    """``nightly-report.md``: verdict, rule, failing cells, then every cell in one table."""
    th = meta["thresholds"]
    out = [f"# Nightly {meta['name']} — run {meta['run_id']}", "", f"**{headline(meta, summary)}**", "",
           f"- run date {meta['run_date']}, code {meta['code_version']}, config `{meta['config_path']}`",
           f"- baseline: {meta.get('baseline_run_id') or '—'} ({meta.get('baseline_how') or 'none'})",
           f"- rule: a cell regresses when it loses more than {th['min_drop_points']:g} points "
           f"({th['clean_min_drop_points']:g} for clean accuracy) and each accuracy is outside the other's "
           f"95% interval; new sanity warnings {'fail' if th['fail_on_new_warnings'] else 'are reported'}",
           f"- models: " + ", ".join(f"{m['trial']} {m['how']}" for m in meta.get("models", [])),
           f"- verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["verdicts"].items()))]
    if summary.get("tracking_missed"):
        out.append(f"- tracking: {summary['tracking_missed']} model run(s) not fully logged to MLflow "
                   f"({meta['tracking_uri']}); `sors sync` backfills them from this folder")
    out.append("")
    failing = [line for line in lines if line["fails"]]
    if failing:
        out += ["## Failing cells", ""]
        for line in failing:
            delta = "" if line["delta_points"] is None else f", {line['delta_points']:+.1f} points"
            out.append(f"- **{line['verdict']}** {cell_name(line)}: {_pct(line['baseline'])} -> "
                       f"{_pct(line['current'])}{delta}")
            out += [f"  - new warning: {w}" for w in line["new_warnings"]]
        out.append("")
    out += ["## Every cell", "", "accuracy % [95% interval]", "",
            "| model | attack | baseline | current | delta (points) | verdict |",
            "| --- | --- | --- | --- | --- | --- |"]
    for line in lines:
        delta = "—" if line["delta_points"] is None else f"{line['delta_points']:+.1f}"
        verdict = f"**{line['verdict']}**" if line["fails"] else line["verdict"]
        out.append(f"| {line['model']} | {_attack_text(line)}{' seed ' + str(line['seed']) if line['seed'] else ''} "
                   f"| {_pct(line['baseline'])} | {_pct(line['current'])} | {delta} | {verdict} |")
    return "\n".join(out) + "\n"


def write_reports(folder: Path, meta: dict, lines: list[dict], summary: dict) -> list[Path]:
    """Write ``nightly-report.md`` and ``nightly-report.json`` into the run folder."""
    md, js = folder / REPORT_MD, folder / REPORT_JSON
    md.write_text(render_markdown(meta, lines, summary))
    _write_json(js, {"meta": meta, "summary": summary, "headline": headline(meta, summary), "cells": lines})
    return [md, js]


# ---------------------------------------------------------------- model reuse

def reusable_records(root: Path, sweep_name: str, code_version: str, before: str) -> dict[tuple[str, str], dict]:
    """``{(trial, config hash): record}`` of models trained by earlier runs of this nightly under the same
    code version whose checkpoint is still there (newest run wins)."""
    from tasks import storage

    found: dict[tuple[str, str], dict] = {}
    for path in sorted(root.glob(f"runs/run_date=*/run_id=*/models/{sweep_name}/*.json"), reverse=True):
        if path.parts[-4] >= f"run_id={before}":
            continue  # this run or a later one
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        key = (record.get("trial"), record.get("config_hash"))
        if key in found or record.get("code_version") != code_version:
            continue
        uri = record.get("checkpoint_uri") or ""
        if storage.is_remote(uri) or Path(uri.removeprefix("file://")).is_file():
            found[key] = dict(record, nightly_origin=record.get("nightly_origin") or path.parts[-4].split("=", 1)[1])
    return found


def seed_reused_models(cfg: NightlyConfig, root: Path, folder: Path, code_version: str, run_id: str) -> list[dict]:
    """Copy reusable model records into this run, so the sweep evaluates them instead of training.

    Goes stage by stage, because a student's config hash includes its teacher's checkpoint. Returns
    ``[{"trial", "how": "reused from RUN" | "trained", "config_hash"}]``.
    """
    from pipeline import presets, sweep as sweep_lib

    candidates = reusable_records(root, cfg.sweep.name, code_version, run_id)
    models = []
    for stage in presets.stages(cfg.sweep.trials):
        for trial in stage:
            teacher = trial.teacher_trial
            if teacher:
                record = sweep_lib.load_record(str(folder), cfg.sweep.name, teacher)
                if record is None:  # teacher will be trained in this run: so will the student
                    models.append({"trial": trial.name, "how": "trained", "config_hash": None})
                    continue
                trial = presets.with_teacher(trial, record["checkpoint_uri"])
            chash = config_lib.config_hash(trial.config)
            record = candidates.get((trial.name, chash))
            if record is None:
                models.append({"trial": trial.name, "how": "trained", "config_hash": chash})
                continue
            sweep_lib.save_record(str(folder), dict(record, evaluated=False))
            models.append({"trial": trial.name, "how": f"reused from {record['nightly_origin']}", "config_hash": chash})
    return models


# ---------------------------------------------------------------- one nightly run

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


def _baseline(cfg: NightlyConfig, root: Path, results_dir: Path, pinned: str | None) -> tuple[str | None, str | None]:
    """(baseline run id, how it was chosen) -- pinned by --baseline / nightly.baseline, else the accepted one."""
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
    try:
        find_run(results_dir, pointer["run_id"])
    except ConfigError:
        raise ConfigError("baseline", f"the accepted baseline run {pointer['run_id']} of nightly {cfg.name} is gone "
                                      f"from {root / 'runs'}", "accept another run with `sors nightly --accept RUN`") from None
    return pointer["run_id"], f"accepted {pointer.get('accepted_at', '')} via {pointer.get('how', '?')}".strip()


def _check_data(cfg: NightlyConfig, data_root: str | None) -> None:
    """Load one test image of every data set before starting Ray: a missing data set fails in seconds."""
    from sors import data as data_lib

    for name, root in {(t.config.data.name, data_root or t.config.data.root) for t in cfg.sweep.trials}:
        data_lib.load(name, "test", root, n=1)


def _update_run(ctx: RunContext, **fields) -> dict:
    path = ctx.folder / RUN_JSON
    run = json.loads(path.read_text()) if path.is_file() else {}
    run.update(fields)
    _write_json(path, run)
    return run


def _log_mlflow(ctx: RunContext, meta: dict, summary: dict, files: list[Path], status: str) -> str | None:
    """A run tagged ``nightly=true`` in experiment ``nightly-<name>``: counts as metrics, the report as
    artifacts. Returns its id (None when MLflow could not be reached; the report is on disk regardless)."""
    from pipeline import tracking

    try:
        experiment = tracking.ensure_experiment(ctx.tracking_uri, ctx.cfg.sweep.name,
                                                str(ctx.results_dir / "mlartifacts"))
        client = tracking.client(ctx.tracking_uri)
        tags = {"nightly": "true", "sors.nightly.name": ctx.cfg.name, "sors.nightly.run_id": ctx.run_id,
                "sors.nightly.verdict": status, "sors.nightly.baseline": meta.get("baseline_run_id") or "",
                tracking.TAG_CODE: ctx.code_version, tracking.TAG_SWEEP: ctx.cfg.sweep.name}
        run = client.create_run(experiment, run_name=f"nightly {ctx.run_id}", tags=tags)
        metrics = {"cells": summary["cells"], "failing_cells": summary["failing"], "exit_code": meta["exit_code"]}
        metrics.update({f"verdict_{k.replace('-', '_')}": v for k, v in summary["verdicts"].items()})
        tracking.log_metrics(ctx.tracking_uri, run.info.run_id, metrics)
        tracking.log_artifacts(ctx.tracking_uri, run.info.run_id, files, "nightly")
        client.set_terminated(run.info.run_id, "FINISHED" if meta["exit_code"] != EXIT_COULD_NOT_RUN else "FAILED")
        return run.info.run_id
    except Exception as err:  # noqa: BLE001 -- tracking trouble must not hide the verdict
        from pipeline.redact import redact  # no password of the URI in the log

        log.warning("could not log the nightly to MLflow (%s): %s", redact(ctx.tracking_uri),
                    redact((str(err).splitlines() or [""])[0]))
        return None


def run_nightly(cfg: NightlyConfig, args: argparse.Namespace) -> int:
    """One nightly run (Ray connected or connectable through ``args``). Returns the exit code."""
    results_dir = Path(args.results_dir).resolve()
    root = nightly_root(results_dir, cfg.name)
    baseline_id, baseline_how = _baseline(cfg, root, results_dir, args.baseline)
    _check_data(cfg, args.data_root)  # before importing Ray: a missing data set fails in seconds
    from pipeline import cli, results, sync, tracking
    from pipeline import sweep as sweep_lib
    run_id = new_run_id()
    folder = run_dir(root, run_id)
    ctx = RunContext(cfg=cfg, results_dir=results_dir, root=root, run_id=run_id, folder=folder,
                     tracking_uri=args.tracking_uri or tracking.default_tracking_uri(results_dir),
                     code_version=tracking.code_version())
    started = datetime.now(timezone.utc)
    _update_run(ctx, run_id=run_id, name=cfg.name, config_path=str(cfg.path.resolve()), status="running",
                exit_code=None, started_at=started.isoformat(timespec="seconds"), code_version=ctx.code_version,
                baseline_run_id=baseline_id, overrides=list(args.overrides), pid=os.getpid())
    print(f"sors nightly {cfg.name}: run {run_id}, baseline {baseline_id or 'none yet'}", flush=True)
    try:
        models = seed_reused_models(cfg, root, folder, ctx.code_version, run_id)
        storage = f"{args.storage_path.rstrip('/')}/nightly/{cfg.name}/{run_id}" if args.storage_path else None
        opts = sweep_lib.SweepOptions(results_dir=str(folder), storage_path=storage, tracking_uri=ctx.tracking_uri,
                                      data_root=args.data_root, progress=not args.no_progress and sys.stderr.isatty())
        tracking.ensure_experiment(ctx.tracking_uri, cfg.sweep.name, str(results_dir / "mlartifacts"))
        connected_here = cli._connect(args)
        try:
            summary_run = sweep_lib.run_sweep(cfg.sweep, opts)
        finally:
            cli._shutdown(connected_here)
        for record in summary_run.records:  # first training run of a model, for later reuse messages
            if record and not record.get("nightly_origin"):
                sweep_lib.save_record(str(folder), dict(record, nightly_origin=run_id))
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
    meta = {"name": cfg.name, "run_id": run_id, "run_date": started.date().isoformat(),
            "config_path": str(cfg.path), "overrides": list(args.overrides), "code_version": ctx.code_version,
            "baseline_run_id": baseline_id, "baseline_how": baseline_how, "self_accepted": baseline_id is None,
            "models": models, "tracking_uri": _redact(ctx.tracking_uri), "cells_store": str(folder / "cells"),
            "thresholds": {"min_drop_points": cfg.settings.min_drop, "clean_min_drop_points": cfg.settings.clean_min_drop,
                           "fail_on_new_warnings": th.fail_on_new_warnings},
            "exit_code": summary["exit_code"], "seconds": round(time.time() - started.timestamp(), 1)}
    files = write_reports(folder, meta, lines, summary)
    status = summary["status"]
    mlflow_run = _log_mlflow(ctx, meta, summary, files, status)
    _update_run(ctx, status=status, exit_code=summary["exit_code"], mlflow_run_id=mlflow_run, summary=summary,
                models=models, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if baseline_id is None:
        accept(results_dir, run_id, how="first run (no baseline yet)")
    _print_summary(meta, lines, summary, files)
    if missed:
        print(sync.failure_message("nightly", missed, str(folder), ctx.tracking_uri, cfg.sweep.name), file=sys.stderr)
    return summary["exit_code"]


def _record_failure(ctx: RunContext, err: BaseException, started: datetime) -> None:
    """A run that could not finish still leaves run.json and a report saying why."""
    reason = _one_line(err)
    meta = {"name": ctx.cfg.name, "run_id": ctx.run_id, "run_date": started.date().isoformat(),
            "config_path": str(ctx.cfg.path), "code_version": ctx.code_version, "exit_code": EXIT_COULD_NOT_RUN,
            "reason": reason}
    ctx.folder.mkdir(parents=True, exist_ok=True)
    (ctx.folder / REPORT_MD).write_text(f"# Nightly {ctx.cfg.name} — run {ctx.run_id}\n\n"
                                        f"**could not run**: {reason}\n")
    _write_json(ctx.folder / REPORT_JSON, {"meta": meta, "summary": None, "headline": f"could not run: {reason}",
                                           "cells": []})
    _update_run(ctx, status="error", exit_code=EXIT_COULD_NOT_RUN, reason=reason,
                finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _print_summary(meta: dict, lines: list[dict], summary: dict, files: list[Path]) -> None:
    for line in lines:
        if line["fails"]:
            delta = "" if line["delta_points"] is None else f" ({line['delta_points']:+.1f} points)"
            print(f"  {line['verdict']:12s} {cell_name(line)}: {_pct(line['baseline'])} -> {_pct(line['current'])}{delta}")
    print(f"report: {files[0]}")
    print(f"sors nightly: exit {summary['exit_code']}: {headline(meta, summary)}", flush=True)


def _one_line(err: BaseException) -> str:
    """The reason a run failed, as one line: the message of errors a user can act on, else the root
    cause's ``SomethingError: message`` line of a wrapped (Ray, Tune) error."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, (ConfigError, FileNotFoundError, NightlyError)):
        return " ".join(str(err).split())
    from pipeline import sweep as sweep_lib

    text = sweep_lib._error_line(err) if str(err).strip() else type(err).__name__
    return text if "Error" in text.split(":")[0] else f"{type(err).__name__}: {text}"


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """``sors nightly`` options: --config or --accept, --baseline, and the CLI's shared options."""
    from pipeline import cli

    parser = argparse.ArgumentParser(prog="sors nightly", description=__doc__.split("\n\n")[0],
                                     epilog="exit codes: 0 no regression, 1 regression, 2 could not run")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="nightly YAML (e.g. infra/nightly/smoke.yaml)")
    what.add_argument("--accept", metavar="RUN", help="make run RUN the baseline of its nightly and exit")
    parser.add_argument("--baseline", metavar="RUN", default=None,
                        help="compare against this run instead of the accepted baseline (pinned)")
    cli._common(parser)
    return parser


def _redact(text: str) -> str:
    """``text`` without URI passwords or tokens (the run's JSON is shared and may reach MLflow)."""
    from pipeline.redact import redact
    return redact(text)


def main(argv: list[str] | None = None) -> int:
    """``sors nightly ...``; returns the exit code (0 no regression, 1 regression, 2 could not run)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code == 0 else EXIT_COULD_NOT_RUN
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.accept:
            pointer, previous = accept(args.results_dir, args.accept)
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
