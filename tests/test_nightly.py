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

import numpy as np
import pytest

from pipeline import nightly
from pipeline.nightly import run as nightly_run
from pipeline.nightly.compare import Thresholds, compare, compare_cell, summarize
from sors.metrics import wilson_interval

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "infra" / "nightly" / "smoke.yaml"


def row(
    accuracy: float,
    n: int = 1000,
    attack: str = "pgd",
    eps: float = 0.1,
    flags=(),
    model: str = "sors",
    first_correct: int = 0,
    first_index: int = 0,
    v1: bool = False,
    **extra,
) -> dict:
    """A stored-cell row as pipeline.store.results returns it, with the Wilson interval of ``accuracy`` on ``n``.

    Per-example outcomes (schema v2): examples ``first_index .. first_index + n - 1``, of which the
    round(accuracy * n) starting at position ``first_correct`` are correct -- so two rows with the same
    ``first_correct`` differ on as few examples as their accuracies allow, and shifting it makes examples
    flip both ways at the same accuracy. ``v1``: a row stored before per-example outcomes existed.
    """
    low, high = wilson_interval(accuracy, n)
    base = {
        "dataset": "fashion_mnist",
        "trial": model,
        "variant": model,
        "model": model.upper(),
        "attack": attack,
        "eps": eps,
        "steps": 7 if attack == "pgd" else None,
        "eot_samples": None,
        "seed": 0,
        "n": n,
        "accuracy": accuracy,
        "ci_low": low,
        "ci_high": high,
        "sanity_flags": list(flags),
    }
    if v1:
        return dict(base, schema_version=1, **extra)
    k = round(accuracy * n)
    correct = np.zeros(n)
    correct[first_correct : first_correct + k] = 1.0
    return dict(
        base,
        schema_version=2,
        example_index=np.arange(first_index, first_index + n),
        example_correct=correct,
        example_correct_min=correct.copy(),
        **extra,
    )


# ---------------------------------------------------------------- the rule, on rows


def test_a_drop_on_the_same_examples_regresses_and_the_same_drop_on_noisy_outcomes_does_not():
    paired = compare_cell(row(0.50, n=200), row(0.44, n=200), Thresholds())  # 12 examples lost, none gained
    assert (paired["verdict"], paired["fails"]) == ("regression", True)
    assert {k: paired["paired"][k] for k in ("n", "b", "c")} == {"n": 200, "b": 12, "c": 0}
    assert paired["paired"]["p_drop"] < 0.001 and paired["delta_points"] == pytest.approx(-6.0)
    noisy = compare_cell(row(0.50, n=200), row(0.44, n=200, first_correct=40), Thresholds())  # 40 lost, 28 gained
    assert {k: noisy["paired"][k] for k in ("b", "c")} == {"b": 40, "c": 28}
    assert (noisy["verdict"], noisy["fails"]) == ("ok", False) and noisy["paired"]["p_drop"] > 0.05
    assert noisy["paired"]["delta_points"] == paired["paired"]["delta_points"] == pytest.approx(-6.0)


def test_cells_that_cannot_be_paired_say_so_instead_of_guessing():
    elsewhere = compare_cell(row(0.50, n=200), row(0.30, n=200, first_index=5000), Thresholds())  # other images
    old = compare_cell(row(0.50, v1=True), row(0.10), Thresholds())  # baseline stored before schema v2
    for line in (elsewhere, old):
        assert (line["verdict"], line["fails"], line["paired"]) == ("not-comparable", False, None)
        assert line["reason"].startswith("not comparable: ")
    assert "no example index in common" in elsewhere["reason"] and "schema v1" in old["reason"]
    assert "the baseline stored" in old["reason"] and old["delta_points"] == pytest.approx(-40.0)
    warned = compare_cell(
        row(0.5, v1=True), row(0.5, v1=True, flags=["zero input gradient on 3/10 examples"]), Thresholds()
    )
    assert (warned["verdict"], warned["fails"]) == ("new-warning", True)  # warnings need no pairing
    summary = summarize([old, elsewhere])
    meta = {"baseline_run_id": "b1", "run_id": "r2", "self_accepted": False}
    assert summary["exit_code"] == 0 and "2 of them NOT COMPARABLE" in nightly.headline(meta, summary)


def test_holm_over_the_nights_cells_withdraws_a_verdict_that_plain_p_would_give():
    weak = (row(0.50, n=200), row(0.47, n=200))  # 6 lost, 0 gained: one-sided p = 1/64
    alone = compare_cell(*weak, Thresholds())
    assert alone["paired"]["p_drop"] == pytest.approx(1 / 64) and alone["verdict"] == "regression"
    strong = (row(0.60, n=200, eps=0.3), row(0.40, n=200, eps=0.3))  # 40 lost: significant in any family
    steady = [(row(0.5, eps=e), row(0.5, eps=e)) for e in (0.05, 0.2)]
    lines = compare(*zip(weak, strong, *steady), Thresholds())
    by_eps = {line["eps"]: line for line in lines}
    assert by_eps[0.1]["paired"]["p_drop_holm"] == pytest.approx(3 / 64)  # second smallest of 4: x3
    assert (by_eps[0.1]["verdict"], by_eps[0.3]["verdict"]) == ("regression", "regression")
    lines = compare(*zip(weak, strong, *steady, (row(0.5, eps=0.4), row(0.5, eps=0.4))), Thresholds())
    weak_line = next(line for line in lines if line["eps"] == 0.1)
    assert weak_line["paired"]["p_drop_holm"] == pytest.approx(4 / 64)  # 5 cells: 1/64 x 4 > 0.05
    assert (weak_line["verdict"], weak_line["fails"]) == ("ok", False)
    assert compare_cell(*weak, Thresholds(alpha=0.01))["verdict"] == "ok"  # alpha is a setting


def test_a_significant_drop_below_the_minimum_is_not_a_regression():
    base, cur = row(0.500, n=20_000), row(0.490, n=20_000)  # 1 point: 200 examples lost, p tiny
    assert compare_cell(base, cur, Thresholds(min_drop=0.0))["paired"]["p_drop_holm"] < 1e-50
    assert compare_cell(base, cur, Thresholds())["verdict"] == "ok"
    assert compare_cell(base, cur, Thresholds(min_drop=0.005))["verdict"] == "regression"


def test_a_large_significant_drop_regresses_and_clean_drops_are_named_apart():
    attacked = compare_cell(row(0.50), row(0.40), Thresholds())
    clean = compare_cell(row(0.90, attack="none", eps=0.0), row(0.80, attack="none", eps=0.0), Thresholds())
    assert (attacked["verdict"], attacked["fails"]) == ("regression", True)
    assert (clean["verdict"], clean["fails"]) == ("clean-drop", True)
    lenient = Thresholds(clean_min_drop=0.15)  # clean accuracy has its own minimum
    assert (
        compare_cell(row(0.90, attack="none", eps=0.0), row(0.80, attack="none", eps=0.0), lenient)["verdict"] == "ok"
    )


def test_the_report_shows_the_paired_test_of_every_cell():
    lines = compare([row(0.5, n=200), row(0.5, eps=0.2, v1=True)], [row(0.44, n=200), row(0.5, eps=0.2)], Thresholds())
    meta = {
        "baseline_run_id": "b1",
        "run_id": "r2",
        "name": "smoke",
        "run_date": "2026-11-28",
        "code_version": "abc",
        "config_path": "c.yaml",
        "tracking_uri": "",
        "thresholds": {
            "min_drop_points": 2.0,
            "clean_min_drop_points": 2.0,
            "fail_on_new_warnings": True,
            "alpha": 0.05,
        },
    }
    md = nightly.render_markdown(meta, lines, summarize(lines))
    p, holm = (_fmt(lines[0]["paired"][k]) for k in ("p_drop", "p_drop_holm"))
    assert f"| 200 | 12 | 0 | {p} | {holm} | -6.0 | **regression** |" in md
    assert "paired n=200, b=12 lost, c=0 gained" in md and "McNemar" in md
    assert "| — | — | — | — | — | — | not-comparable |" in md and "schema v1" in md
    assert json.loads(json.dumps(lines))[0]["paired"]["b"] == 12  # the JSON report carries the same numbers


def _fmt(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def test_runs_mlflow_missed_fail_an_otherwise_passing_nightly_and_the_report_says_how_to_repair():
    lines = [compare_cell(row(0.50), row(0.50), Thresholds())]
    meta = {
        "baseline_run_id": "b1",
        "run_id": "r2",
        "name": "smoke",
        "run_date": "2026-11-28",
        "code_version": "abc",
        "config_path": "c.yaml",
        "tracking_uri": "http://mlflow:5000",
        "thresholds": {
            "min_drop_points": 2.0,
            "clean_min_drop_points": 1.0,
            "fail_on_new_warnings": False,
            "alpha": 0.05,
        },
    }
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
    bad.write_text(SMOKE.read_text().replace("alpha: 0.05", "alpha: 5"))
    assert nightly.main(["--config", str(bad), "--results-dir", str(tmp_path)]) == 2
    assert "nightly.alpha" in capsys.readouterr().err
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
    """The smoke nightly four times on one local Ray: baseline, the same again (models reused), an
    untrained network, and the first config under another code version (models retrained).

    The code version is pinned: other work committed to this checkout meanwhile would change it, and
    a changed code version rightly means "train again" (the fourth run does exactly that)."""
    from pipeline.cluster import connection as cluster
    from pipeline.tracking import runs as tracking

    results = tmp_path_factory.mktemp("nightly")
    version = tracking.code_version()
    cluster.connect(None, num_cpus=2)
    runs = {}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, extra, code in (
                ("first", (), version),
                ("second", (), version),
                ("weak", ("--set", "train.epochs=0"), version),
                ("recoded", (), f"{version}-changed"),
            ):
                patch.setattr(tracking, "code_version", lambda code=code: code)
                runs[name] = _nightly(results, *extra)
    finally:
        cluster.shutdown()
    return results, runs


def _client(results: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")


def _night_runs(results: Path, night: str) -> dict:
    """``{trial: run}`` of the runs nested under night ``night``'s parent run."""
    client = _client(results)
    experiment = client.get_experiment_by_name("nightly-smoke").experiment_id
    (parent,) = client.search_runs([experiment], filter_string=f"tags.`sors.nightly.run_id` = '{night}'")
    nested = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in nested}


def _night_rows(results: Path, night: str) -> list[dict]:
    from pipeline.store import results as results_lib

    return results_lib.read_rows(nightly.find_run(results, night) / "cells")


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
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("sors nightly: exit 0: no regression: 6 cells against baseline " + first)
    )
    report = _report(results, _run_id(out))
    assert report["summary"]["failing"] == 0 and report["meta"]["baseline_run_id"] == first
    assert {c["verdict"] for c in report["cells"]} <= {"ok", "improved"}
    assert all(c["baseline"] and c["current"] and c["delta_points"] is not None for c in report["cells"])
    assert "no regression" in report["md"] and report["md"].count("| ok |") + report["md"].count("| improved |") == 6
    # same config, same code: both models reused, not retrained
    assert [m["how"] for m in report["meta"]["models"]] == [f"reused from {first}"] * 2
    # the first night accepted itself: alias `baseline` points at its registered versions
    from pipeline.nightly import tracked
    from pipeline.tracking import model_registry

    versions = tracked.night_versions(nightly.find_run(results, first))
    assert sorted(versions) == ["nightly-smoke.lenet5", "nightly-smoke.sors"]
    assert model_registry.alias_versions(f"sqlite:///{results / 'mlflow.db'}", sorted(versions)) == versions


@pytest.mark.slow
@pytest.mark.ray
def test_a_reused_model_gets_its_own_run_per_night_holding_that_nights_metrics(smoke_runs):
    results, runs = smoke_runs
    first, second = _run_id(runs["first"][1]), _run_id(runs["second"][1])
    client = _client(results)
    night1, night2 = _night_runs(results, first), _night_runs(results, second)
    assert sorted(night1) == sorted(night2) == ["lenet5", "sors"]
    for trial in night1:
        one, two = night1[trial], night2[trial]
        assert one.info.run_id != two.info.run_id  # a run per night, nested under that night's run
        for run, night in ((one, first), (two, second)):  # each run holds its own night's values
            mine = [r for r in _night_rows(results, night) if r["trial"] == trial]
            assert mine and all(r["mlflow_run_id"] == run.info.run_id for r in mine)
            for row in mine:
                key = "clean_eval" if row["attack"] == "none" else f"{row['attack']}_eps{row['eps']:.3f}"
                assert run.data.metrics[f"{key}_acc"] == pytest.approx(row["accuracy"])
                assert len(client.get_metric_history(run.info.run_id, f"{key}_acc")) == 1
        # the model is not logged again: the second night's run names the first night's version
        version = client.get_model_version(f"nightly-smoke.{trial}", two.data.tags["sors.model_version"])
        assert version.run_id == one.info.run_id and not two.outputs.model_outputs
        assert "loss" in one.data.metrics and "loss" not in two.data.metrics  # the training curve stays on one
        record = json.loads(
            (nightly.find_run(results, second) / "models" / "nightly-smoke" / f"{trial}.json").read_text()
        )
        assert record["mlflow_run_id"] == two.info.run_id


@pytest.mark.slow
@pytest.mark.ray
def test_a_model_retrained_after_a_code_change_gets_a_new_run_and_version(smoke_runs):
    results, runs = smoke_runs
    first, recoded = _run_id(runs["first"][1]), _run_id(runs["recoded"][1])
    report = _report(results, recoded)
    assert [m["how"] for m in report["meta"]["models"]] == ["trained"] * 2
    client = _client(results)
    old, new = _night_runs(results, first), _night_runs(results, recoded)
    for trial in old:
        assert new[trial].info.run_id != old[trial].info.run_id
        record = json.loads(
            (nightly.find_run(results, recoded) / "models" / "nightly-smoke" / f"{trial}.json").read_text()
        )
        version = client.get_model_version(record["registered_model"]["name"], record["registered_model"]["version"])
        assert version.run_id == new[trial].info.run_id  # the retrained model is on its own run
        old_version = old[trial].data.tags
        assert (
            old_version["sors.checkpoint_sha256"]
            == json.loads(
                (nightly.find_run(results, first) / "models" / "nightly-smoke" / f"{trial}.json").read_text()
            )["checkpoint_sha256"]
        )
        assert len(client.search_model_versions(f"name = 'nightly-smoke.{trial}'")) == 3  # first, weak, recoded


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
    assert json.loads((results / "nightly" / "smoke" / "baseline.json").read_text())["run_id"] == _run_id(
        runs["first"][1]
    )


@pytest.mark.slow
@pytest.mark.ray
def test_nightly_parquet_is_partitioned_by_run_date_and_mlflow_has_tagged_runs(smoke_runs):
    import duckdb
    from mlflow.tracking import MlflowClient

    results, runs = smoke_runs
    pattern = results / "nightly" / "smoke" / "runs" / "*" / "*" / "cells" / "*" / "*" / "*.parquet"
    counts = duckdb.sql(
        f"select run_date, run_id, count(*) as n from read_parquet('{pattern}', hive_partitioning=true) "
        "group by all order by run_id"
    ).fetchall()
    ids = [_run_id(runs[k][1]) for k in ("first", "second", "weak", "recoded")]
    assert [(r[1], r[2]) for r in counts] == [(i, 6) for i in ids]
    assert all(len(str(r[0])) == 10 for r in counts)  # YYYY-MM-DD

    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nightly-smoke")
    tagged = client.search_runs([experiment.experiment_id], filter_string="tags.nightly = 'true'")
    verdicts = {r.data.tags["sors.nightly.run_id"]: r.data.tags["sors.nightly.verdict"] for r in tagged}
    assert {k: verdicts[k] for k in ids[:3]} == {ids[0]: "passed", ids[1]: "passed", ids[2]: "regression"}
    assert set(verdicts) == set(ids)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    weak = next(r for r in tagged if r.data.tags["sors.nightly.run_id"] == ids[2])
    assert weak.data.metrics["failing_cells"] >= 1
    assert {a.path for a in client.list_artifacts(weak.info.run_id, "nightly")} == {
        "nightly/nightly-report.md",
        "nightly/nightly-report.json",
    }
    assert {a.path for a in client.list_artifacts(weak.info.run_id, "trend")} == {
        "trend/nightly-trend.png",
        "trend/nightly-trend.csv",
    }
    assert 0 <= weak.data.metrics["clean_acc.LeNet-5"] <= 1  # the trend's point of that night, on its run


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
    assert nightly_run._baseline(cfg, root, results, None)[0] == weak
    assert nightly_run._baseline(cfg, root, results, first)[0] == first  # --baseline pins another run
    # the registry alias moved with it, and it decides: moved back by hand (as in the UI), the nightly
    # compares against the night whose versions it names
    from pipeline.nightly import tracked
    from pipeline.tracking import model_registry

    uri = f"sqlite:///{results / 'mlflow.db'}"
    weak_versions = tracked.night_versions(nightly.find_run(results, weak))
    assert model_registry.alias_versions(uri, sorted(weak_versions)) == weak_versions
    assert nightly_run._baseline(cfg, root, results, None, uri)[0] == weak
    model_registry.set_alias(uri, tracked.night_versions(nightly.find_run(results, first)))
    assert nightly_run._baseline(cfg, root, results, None, uri)[0] == first


def test_a_nightly_that_cannot_reach_its_data_exits_2_with_one_line(tmp_path):
    sors = Path(sys.executable).with_name("sors")
    done = subprocess.run(
        [
            str(sors),
            "nightly",
            "--config",
            str(SMOKE),
            "--results-dir",
            str(tmp_path),
            "--data-root",
            str(tmp_path / "no-such-folder"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, MLFLOW_TRACKING_URI=""),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sors nightly: exit 2: could not run:") and "no-such-folder" in lines[0]
    assert not (tmp_path / "nightly" / "smoke" / "baseline.json").exists()
