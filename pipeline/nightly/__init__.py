"""``sors nightly``: the scheduled robustness regression.

One nightly run trains the configured reference models -- or reuses a model whose resolved config
hash and code version are unchanged -- evaluates the fixed attack suite through the sweep's Ray
fan-out, and compares every cell with the accepted baseline run::

    sors nightly --config infra/nightly/smoke.yaml        # exit 0 no regression, 1 regression (or runs MLflow missed), 2 could not run
    sors nightly --accept 20250102T020000Z-3f9a           # promote a run to the baseline of its nightly

A cell *regresses* when, on the examples both runs scored (paired on ``example_index``), its
accuracy drops by more than ``min_drop`` points AND the exact one-sided McNemar test of that drop,
Holm-corrected over the night's compared cells, is significant at ``alpha`` (0.05). Clean-accuracy
cells use ``clean_min_drop``; a sanity-check warning the baseline cell did not have is flagged too;
a cell whose rows cannot be paired (schema v1, no shared example) is "not-comparable". The first run of a nightly, with no baseline, accepts
itself and says so.

Config: a preset-format YAML (``name``, ``base``, ``trials``, ``evaluation``; or ``preset: NAME`` to
reference a shipped preset) plus a ``nightly:`` section with :class:`Settings`.

Layout under ``<results>/nightly/<name>/`` (plain files, meant to be read)::

    baseline.json                                 the accepted run: {"run_id", "accepted_at", "how"}
    accepted.jsonl                                every acceptance, one JSON line each
    runs/run_date=YYYY-MM-DD/run_id=<id>/
        run.json                                  status, exit code, reason, code version, baseline
        nightly-report.md, nightly-report.json    every cell: baseline, current, delta, verdict
        cells/dataset=*/attack=*/<cell>.parquet   this run's rows (pipeline.store.results layout)
        models/nightly-<name>/<trial>.json        model records (a reused one points at its first run)
        ray/                                      Ray Train checkpoints and Tune state of this run

so ``read_parquet('<results>/nightly/<name>/runs/*/*/cells/*/*/*.parquet', hive_partitioning=true)``
(DuckDB) sees ``run_date``, ``run_id``, ``dataset`` and ``attack`` columns. MLflow (``tracked``): each
night is a parent run tagged ``nightly=true`` in experiment ``nightly-<name>``, its trial runs nested
under it (a reused model gets a run per night too), with the counts and per-model accuracies as
metrics and the report files and the trend over nights as artifacts; ``--accept`` moves the registry
alias ``baseline`` of each model to the night's versions, and that alias picks the night compared
against (``baseline.json`` caches it).

Modules: ``config`` (the YAML and its ``nightly:`` section), ``store`` (run folders, baseline pointer,
acceptance, model reuse), ``compare`` (the verdict: pure functions over rows), ``report`` (Markdown and
JSON reports), ``tracked`` (MLflow runs, trend, the baseline alias), ``run`` (one run and the command line).
"""

# not the function `compare`: it would hide the submodule of that name
from pipeline.nightly.compare import Thresholds, compare_cell, summarize
from pipeline.nightly.config import LAST_ACCEPTED, NightlyConfig, NightlyError, Settings, load_config
from pipeline.nightly.report import cell_name, headline, render_markdown
from pipeline.nightly.run import main, run_nightly
from pipeline.nightly.store import (
    EXIT_COULD_NOT_RUN,
    EXIT_OK,
    EXIT_REGRESSION,
    REPORT_JSON,
    REPORT_MD,
    accept,
    find_run,
)

__all__ = [
    "EXIT_COULD_NOT_RUN",
    "EXIT_OK",
    "EXIT_REGRESSION",
    "LAST_ACCEPTED",
    "REPORT_JSON",
    "REPORT_MD",
    "NightlyConfig",
    "NightlyError",
    "Settings",
    "Thresholds",
    "accept",
    "cell_name",
    "compare_cell",
    "find_run",
    "headline",
    "load_config",
    "main",
    "render_markdown",
    "run_nightly",
    "summarize",
]
