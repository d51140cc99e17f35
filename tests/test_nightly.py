"""`sors nightly`: the comparison rule on rows, and the smoke nightly end to end on real Fashion-MNIST
with a local Ray, real Parquet and a real MLflow (SQLite) store: twice against itself (exit 0), with an
untrained network (exit 1, the regressed cells named), without its data (exit 2, one line)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import nightly
from pipeline.nightly import run as nightly_run
from pipeline.nightly.compare import Thresholds, compare, compare_cell, significant_drop, summarize
from sors.metrics import wilson_interval

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "infra" / "nightly" / "smoke.yaml"


def row(accuracy: float, n: int = 1000, attack: str = "pgd", eps: float = 0.1, flags=(), model: str = "sors",
        **extra) -> dict:
    """A stored-cell row as pipeline.results returns it, with the Wilson interval of ``accuracy`` on ``n``."""
    low, high = wilson_interval(accuracy, n)
    return {"dataset": "fashion_mnist", "trial": model, "variant": model, "model": model.upper(), "attack": attack,
            "eps": eps, "steps": 7 if attack == "pgd" else None, "eot_samples": None, "seed": 0, "n": n,
            "accuracy": accuracy, "ci_low": low, "ci_high": high, "sanity_flags": list(flags), **extra}


# ---------------------------------------------------------------- the rule, on rows

def test_a_drop_inside_the_confidence_intervals_is_not_a_regression():
    line = compare_cell(row(0.50, n=100), row(0.44, n=100), Thresholds())  # 6 points, but n=100: noise
    assert line["verdict"] == "ok" and not line["fails"]
    assert line["delta_points"] == pytest.approx(-6.0)


def test_a_significant_drop_below_the_minimum_is_not_a_regression():
    base, cur = row(0.500, n=200_000), row(0.490, n=200_000)  # 1 point, far outside both intervals
    assert significant_drop(base, cur, 0.0)
    assert compare_cell(base, cur, Thresholds())["verdict"] == "ok"
    assert compare_cell(base, cur, Thresholds(min_drop=0.005))["verdict"] == "regression"


def test_a_large_significant_drop_regresses_and_clean_drops_are_named_apart():
    attacked = compare_cell(row(0.50), row(0.40), Thresholds())
    clean = compare_cell(row(0.90, attack="none", eps=0.0), row(0.80, attack="none", eps=0.0), Thresholds())
    assert (attacked["verdict"], attacked["fails"]) == ("regression", True)
    assert (clean["verdict"], clean["fails"]) == ("clean-drop", True)
    lenient = Thresholds(clean_min_drop=0.15)  # clean accuracy has its own minimum
    assert compare_cell(row(0.90, attack="none", eps=0.0), row(0.80, attack="none", eps=0.0), lenient)["verdict"] == "ok"


def test_runs_mlflow_missed_fail_an_otherwise_passing_nightly_and_the_report_says_how_to_repair():
    lines = [compare_cell(row(0.50), row(0.50), Thresholds())]
    meta = {"baseline_run_id": "b1", "run_id": "r2", "name": "smoke", "run_date": "2026-11-28",
            "code_version": "abc", "config_path": "c.yaml", "tracking_uri": "http://mlflow:5000",
            "thresholds": {"min_drop_points": 2.0, "clean_min_drop_points": 1.0, "fail_on_new_warnings": False}}
    tracked, untracked = nightly.summarize(lines), nightly.summarize(lines, tracking_missed=2)
    assert (tracked["status"], tracked["exit_code"]) == ("passed", 0)
    assert (untracked["status"], untracked["exit_code"]) == ("tracking-incomplete", 1)
    assert nightly.headline(meta, untracked).startswith("TRACKING INCOMPLETE: 2 run(s)")
    assert "`sors sync`" in nightly.render_markdown(meta, lines, untracked)
    regressed = nightly.summarize([compare_cell(row(0.50), row(0.30), Thresholds())], tracking_missed=2)
    assert regressed["status"] == "regression"  # the regression is the news; tracking is secondary


def test_improvements_are_reported_and_do_not_fail():
    line = compare_cell(row(0.40), row(0.55), Thresholds())
    assert (line["verdict"], line["fails"]) == ("improved", False)


def test_a_new_kind_of_sanity_warning_fails_but_the_same_warning_with_new_numbers_does_not():
    old = "pgd (7 steps) at eps=25/255 leaves 46.1% accuracy, more than fgsm at eps=25/255 (28.1%): weaker"
    same_kind = "pgd (7 steps) at eps=25/255 leaves 47.0% accuracy, more than fgsm at eps=25/255 (27.3%): weaker"
    other = "zero input gradient on 12/1000 examples: gradient-based attacks cannot move"
    assert compare_cell(row(0.5, flags=[old]), row(0.5, flags=[same_kind]), Thresholds())["verdict"] == "ok"
    line = compare_cell(row(0.5, flags=[old]), row(0.5, flags=[same_kind, other]), Thresholds())
    assert (line["verdict"], line["fails"], line["new_warnings"]) == ("new-warning", True, [other])
    assert not compare_cell(row(0.5), row(0.5, flags=[other]), Thresholds(fail_on_new_warnings=False))["fails"]


def test_cells_are_matched_across_retrained_checkpoints_and_missing_cells_fail():
    base = [row(0.9, attack="none", eps=0.0, cell_id="a"), row(0.5, cell_id="b"), row(0.3, attack="mim", cell_id="c")]
    cur = [row(0.9, attack="none", eps=0.0, cell_id="x"), row(0.5, cell_id="y"), row(0.2, eps=0.2, cell_id="z")]
    lines = compare(base, cur, Thresholds())
    verdicts = {(l["attack"], l["eps"]): l["verdict"] for l in lines}
    assert verdicts == {("none", 0.0): "ok", ("pgd", 0.1): "ok", ("pgd", 0.2): "new", ("mim", 0.1): "missing"}
    summary = summarize(lines)
    assert summary["exit_code"] == 1 and summary["failing"] == 1 and summary["cells"] == 4


def test_nightly_config_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("new_warnings: fail", "new_warnings: fail\n  min_dorp: 3"))
    assert nightly.main(["--config", str(bad), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nightly.min_dorp" in err[0] and err[0].startswith("sors nightly: exit 2: could not run")
    assert nightly.main(["--accept", "20200101T000000Z-abcd", "--results-dir", str(tmp_path)]) == 2
    assert "no nightly run 20200101T000000Z-abcd" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end (smoke.yaml)

def _nightly(results: Path, *extra: str) -> tuple[int, str, float]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = nightly.main(["--config", str(SMOKE), "--results-dir", str(results), "--no-progress", *extra])
    return code, out.getvalue(), time.perf_counter() - start


def _report(results: Path, run_id: str) -> dict:
    folder = nightly.find_run(results, run_id)
    return json.loads((folder / nightly.REPORT_JSON).read_text()) | {"md": (folder / nightly.REPORT_MD).read_text()}


def _run_id(output: str) -> str:
    return output.split("sors nightly smoke: run ", 1)[1].split(",", 1)[0]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke nightly three times on one local Ray: baseline, the same again, an untrained network.

    The code version is pinned for the three runs: other work committed to this checkout meanwhile
    would change it, and a changed code version rightly means "train again"."""
    from pipeline import cluster, tracking

    results = tmp_path_factory.mktemp("nightly")
    version = tracking.code_version()
    cluster.connect(None, num_cpus=2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tracking, "code_version", lambda: version)
            runs = {name: _nightly(results, *extra) for name, extra in
                    (("first", ()), ("second", ()), ("weak", ("--set", "train.epochs=0")))}
    finally:
        cluster.shutdown()
    return results, runs


@pytest.mark.slow
@pytest.mark.ray
def test_first_nightly_accepts_itself_and_the_second_finds_no_regression(smoke_runs):
    results, runs = smoke_runs
    code, out, _ = runs["first"]
    first = _run_id(out)
    assert code == 0, out
    assert "no baseline yet" in out and "accepted itself as the baseline" in out
    assert json.loads((results / "nightly" / "smoke" / "baseline.json").read_text())["run_id"] == first

    code, out, seconds = runs["second"]
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("sors nightly: exit 0: no regression: 6 cells against baseline " + first)
    report = _report(results, _run_id(out))
    assert report["summary"]["failing"] == 0 and report["meta"]["baseline_run_id"] == first
    assert {c["verdict"] for c in report["cells"]} <= {"ok", "improved"}
    assert all(c["baseline"] and c["current"] and c["delta_points"] is not None for c in report["cells"])
    assert "no regression" in report["md"] and report["md"].count("| ok |") + report["md"].count("| improved |") == 6
    # same config, same code: both models reused, not retrained
    assert [m["how"] for m in report["meta"]["models"]] == [f"reused from {first}"] * 2


@pytest.mark.slow
@pytest.mark.ray
def test_an_untrained_network_is_a_regression_naming_the_cells(smoke_runs):
    results, runs = smoke_runs
    code, out, _ = runs["weak"]
    assert code == 1, out
    report = _report(results, _run_id(out))
    failing = [c for c in report["cells"] if c["fails"]]
    assert report["summary"]["exit_code"] == 1 and len(failing) == report["summary"]["failing"] >= 1
    lenet_clean = next(c for c in report["cells"] if c["model"] == "LeNet-5" and c["attack"] == "none")
    assert lenet_clean["verdict"] == "clean-drop" and lenet_clean["delta_points"] < -20
    for cell in failing:  # every failing cell is named in the console output and in the Markdown report
        assert nightly.cell_name(cell) in out and nightly.cell_name(cell) in report["md"]
    assert "REGRESSION" in report["md"] and [m["how"] for m in report["meta"]["models"]] == ["trained"] * 2
    # the baseline did not move: a regression is not accepted on its own
    assert json.loads((results / "nightly" / "smoke" / "baseline.json").read_text())["run_id"] == _run_id(runs["first"][1])


@pytest.mark.slow
@pytest.mark.ray
def test_nightly_parquet_is_partitioned_by_run_date_and_mlflow_has_tagged_runs(smoke_runs):
    import duckdb
    from mlflow.tracking import MlflowClient

    results, runs = smoke_runs
    pattern = results / "nightly" / "smoke" / "runs" / "*" / "*" / "cells" / "*" / "*" / "*.parquet"
    counts = duckdb.sql(f"select run_date, run_id, count(*) as n from read_parquet('{pattern}', hive_partitioning=true) "
                        "group by all order by run_id").fetchall()
    ids = [_run_id(runs[k][1]) for k in ("first", "second", "weak")]
    assert [(r[1], r[2]) for r in counts] == [(i, 6) for i in ids]
    assert all(len(str(r[0])) == 10 for r in counts)  # YYYY-MM-DD

    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nightly-smoke")
    tagged = client.search_runs([experiment.experiment_id], filter_string="tags.nightly = 'true'")
    verdicts = {r.data.tags["sors.nightly.run_id"]: r.data.tags["sors.nightly.verdict"] for r in tagged}
    assert verdicts == {ids[0]: "passed", ids[1]: "passed", ids[2]: "regression"}
    weak = next(r for r in tagged if r.data.tags["sors.nightly.run_id"] == ids[2])
    assert weak.data.metrics["failing_cells"] >= 1
    assert {a.path for a in client.list_artifacts(weak.info.run_id, "nightly")} == {
        "nightly/nightly-report.md", "nightly/nightly-report.json"}


@pytest.mark.slow
@pytest.mark.ray
def test_accept_promotes_a_run_to_the_baseline(smoke_runs, capsys):
    results, runs = smoke_runs
    first, weak = _run_id(runs["first"][1]), _run_id(runs["weak"][1])
    assert nightly.main(["--accept", weak, "--results-dir", str(results)]) == 0
    assert f"run {weak} is now the baseline of nightly smoke (was {first})" in capsys.readouterr().out
    root = results / "nightly" / "smoke"
    assert json.loads((root / "baseline.json").read_text())["run_id"] == weak
    assert [json.loads(l)["run_id"] for l in (root / "accepted.jsonl").read_text().splitlines()] == [first, weak]
    cfg = nightly.load_config(SMOKE)
    assert nightly_run._baseline(cfg, root, results, None) [0] == weak
    assert nightly_run._baseline(cfg, root, results, first)[0] == first  # --baseline pins another run


def test_a_nightly_that_cannot_reach_its_data_exits_2_with_one_line(tmp_path):
    sors = Path(sys.executable).with_name("sors")
    done = subprocess.run([str(sors), "nightly", "--config", str(SMOKE), "--results-dir", str(tmp_path),
                           "--data-root", str(tmp_path / "no-such-folder")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, MLFLOW_TRACKING_URI=""))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sors nightly: exit 2: could not run:") and "no-such-folder" in lines[0]
    assert not (tmp_path / "nightly" / "smoke" / "baseline.json").exists()
