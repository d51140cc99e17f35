"""The distributed pipeline end to end: --set, Ray Train (2 workers), the smoke sweep through Tune,
Ray-task evaluation into Parquet, a real MLflow server, reports and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.plan import presets
from pipeline.store import results
from pipeline.tracking import runs as tracking
from sors import config as config_lib
from sors.errors import ConfigError
from tests import mlflow_view

pytestmark = pytest.mark.timeout(400)


# ---------------------------------------------------------------- --set on the command line


def test_unknown_set_key_is_rejected_with_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.lamda.*did you mean train.lambda"):
        presets.build_sweep("smoke", ["train.lamda=3"])
    code = cli.main(["sweep", "smoke", "--set", "train.lamda=3", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("sors sweep: error: train.lamda") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "cells").exists()  # nothing ran


# ---------------------------------------------------------------- cells and the Parquet store


def _spec(**changes):
    import dataclasses

    from tasks.cells import CellSpec

    base = CellSpec(
        checkpoint_uri="/x/model.pt",
        checkpoint_sha256="ab" * 32,
        dataset="fashion_mnist",
        attack=config_lib.AttackConfig("pgd", 25 / 255),
        eval=config_lib.EvalConfig(),
        seed=0,
        sweep="a",
        trial="t",
        mlflow_run_id="r1",
    )
    return dataclasses.replace(base, **changes)


def test_cell_id_is_content_addressed():
    same = _spec(sweep="other", trial="u", checkpoint_uri="s3://b/model.pt", mlflow_run_id="r2", code_version="x")
    assert _spec().cell_id == same.cell_id  # where and by whom it ran is not part of the identity
    for changed in (
        _spec(checkpoint_sha256="cd" * 32),
        _spec(seed=1),
        _spec(average_paths=2),
        _spec(attack=config_lib.AttackConfig("pgd", 50 / 255)),
        _spec(attack=config_lib.AttackConfig("pgd", 25 / 255, steps=14)),
        _spec(eval=config_lib.EvalConfig(repeats=2)),
    ):
        assert changed.cell_id != _spec().cell_id


def test_rewriting_a_cell_replaces_its_row(tmp_path):
    from datetime import datetime, timezone

    row = {
        "cell_id": _spec().cell_id,
        "schema_version": 1,
        "dataset": "fashion_mnist",
        "attack": "pgd",
        "eps": 25 / 255,
        "n": 10,
        "correct": 3.0,
        "accuracy": 0.3,
        "sanity_flags": [],
        "created_at": datetime.now(timezone.utc),
    }
    results.write_row(tmp_path, row)
    results.update_flags(tmp_path, results.read_rows(tmp_path), {row["cell_id"]: ["masked?"]})
    rows = results.read_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["sanity_flags"] == ["masked?"] and rows[0]["attack"] == "pgd"
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".parquet"]  # no temp files left
    assert results.is_done(tmp_path, _spec()) and not results.is_done(tmp_path, _spec(seed=3))


def test_a_failed_cell_write_leaves_no_file_and_stale_temporaries_are_swept(tmp_path, monkeypatch):
    import os
    import time
    from datetime import datetime, timezone

    row = {
        "cell_id": _spec().cell_id,
        "schema_version": 1,
        "dataset": "fashion_mnist",
        "attack": "pgd",
        "eps": 25 / 255,
        "n": 10,
        "correct": 3.0,
        "accuracy": 0.3,
        "sanity_flags": [],
        "created_at": datetime.now(timezone.utc),
    }

    def disk_full(table, where):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.pq, "write_table", disk_full)
    with pytest.raises(OSError):
        results.write_row(tmp_path, row)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # the half-written temporary went with the error

    folder = tmp_path / "dataset=fashion_mnist" / "attack=pgd"  # a writer SIGKILLed an hour ago, one writing now
    stale, live = folder / f".{row['cell_id']}.0badf00d.tmp", folder / f".{row['cell_id']}.5eed5eed.tmp"
    for tmp in (stale, live):
        tmp.write_bytes(b"PAR1 half a file")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert results.remove_stale_temporaries(tmp_path) == 1
    assert live.exists() and not stale.exists()


# ---------------------------------------------------------------- Ray Train: 2 workers


@pytest.mark.ray
def test_two_ray_train_workers_end_an_epoch_with_identical_parameters(ray_session, tmp_path):
    from pipeline.cluster import trainer
    from sors import train as train_lib
    from tasks import training

    cfg = config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(),
            {
                "model.name": "sors_lenet5",
                "data.n_train": 512,
                "data.n_test": 64,
                "train.epochs": 1,
                "train.optimizer": "adam",
                "train.lr": 0.002,
                "train.num_workers": 2,
                "train.use_gpu": False,
            },
        )
    )
    outcome = trainer.train_on_ray(cfg, "two-workers", str(tmp_path / "ray"))
    digests = training.rank_digests(outcome.checkpoint_dir)
    assert sorted(digests) == [0, 1]
    assert digests[0] == digests[1], "ranks diverged: gradients were not averaged or paths differed"
    model, _, payload = train_lib.load_checkpoint(Path(outcome.checkpoint_uri))
    assert training.params_digest(model) == digests[0]  # the saved weights are the ranks' weights
    assert payload["epoch"] == 1 and payload["history"][0]["loss"] > 0


# ---------------------------------------------------------------- the smoke sweep, end to end


def _run_files(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in results.files(root / "cells")}


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_end_to_end(ray_session, mlflow_server, tmp_path, capsys):
    import duckdb
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipeline import sweep as sweep_lib

    args = ["sweep", "smoke", "--results-dir", str(tmp_path), "--tracking-uri", mlflow_server, "--no-progress"]
    commit = tracking.git_commit()  # of this checkout (None outside git): the source commit every run names
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "LeNet-5" in printed and "SORS" in printed

    # Parquet: one row per expected cell, unique ids, readable with pyarrow, pandas and DuckDB
    smoke = presets.build_sweep("smoke")
    per_model = len(smoke.evaluation.attack_configs())
    table = results.read_table(tmp_path / "cells")
    assert table.num_rows == per_model * len(smoke.trials) == 6
    ids = table.column("cell_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert set(table.column("attack").to_pylist()) == {"none", "fgsm", "pgd"}
    assert set(table.column("schema_version").to_pylist()) == {2}
    frame = pd.read_parquet(tmp_path / "cells")
    assert len(frame) == 6 and set(frame["dataset"].astype(str)) == {"fashion_mnist"}
    count = duckdb.sql(
        f"select count(distinct cell_id) from read_parquet('{tmp_path}/cells/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0][0]
    assert count == 6
    rows = table.to_pylist()
    for row in rows:
        assert 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
        assert row["n"] == 64 and row["sweep"] == "smoke" and row["mlflow_run_id"]
    sors_rows = [r for r in rows if r["trial"] == "sors"]
    assert all(r["all_path_accuracy"] is not None for r in sors_rows)  # randomized: worst-case view recorded
    assert all(r["all_path_exact"] and r["all_path_count"] == 1024 for r in sors_rows)  # every path, exactly
    for row in rows:  # per-example outcomes, aligned, on the same test images in every cell
        assert len(row["example_index"]) == len(row["example_correct"]) == len(row["example_correct_min"]) == 64
        assert sum(row["example_correct"]) == pytest.approx(row["correct"])
    assert len({tuple(r["example_index"]) for r in rows}) == 1

    # a rerun runs no trial and no task and adds (or rewrites) no row
    before = _run_files(tmp_path)
    opts = sweep_lib.SweepOptions(results_dir=str(tmp_path), tracking_uri=mlflow_server, progress=False)
    summary = sweep_lib.run_sweep(smoke, opts)
    assert (summary.trials_run, summary.cells_submitted, len(summary.rows)) == (0, 0, 6)
    assert _run_files(tmp_path) == before

    # MLflow server: a parent run for the sweep, one nested run per trial, with params, per-epoch metrics,
    # evaluation metrics, data inputs, the source commit, artifacts and a registered model
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    everything = client.search_runs([experiment.experiment_id])
    parent = [r for r in everything if r.data.tags.get("sors.run_role") == "sweep"]
    assert len(parent) == 1
    runs = [r for r in everything if r not in parent]
    assert sorted(r.info.run_name for r in runs) == ["lenet5", "sors"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent[0].info.run_id}
    assert all(r.data.tags.get("mlflow.source.git.commit") == commit for r in everything)
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    report_files = {Path(a.path).name for a in client.list_artifacts(parent[0].info.run_id, "report")}
    assert {"table.md", "table.csv", "accuracy_vs_eps.png"} <= report_files
    for run in runs:
        record = json.loads((tmp_path / "models" / "smoke" / f"{run.info.run_name}.json").read_text())
        assert record["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
        cfg = config_lib.from_dict(record["config"])
        assert set(config_lib.flat_dict(cfg)) <= set(run.data.params)
        assert run.data.params["train.lambda"] == str(cfg.train.lambda_)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
        assert "clean_acc" in run.data.metrics
        pgd = [r for r in rows if r["trial"] == run.info.run_name and r["attack"] == "pgd"][0]
        assert run.data.metrics[f"pgd_eps{pgd['eps']:.3f}_acc"] == pytest.approx(pgd["accuracy"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"cells", "checkpoint"} <= artifacts and "report" not in artifacts  # the report: on the parent
        assert run.data.tags["sors.preset"] == "smoke" and run.data.tags["sors.code_version"]
        assert any(m.source_run_id == run.info.run_id for m in models)
        contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(contexts) == {"training", "evaluation"} and all(len(d.digest) == 16 for d in contexts.values())
        assert record["registered_model"]["name"] == f"smoke.{run.info.run_name}"
        version = client.get_model_version(record["registered_model"]["name"], record["registered_model"]["version"])
        assert version.run_id == run.info.run_id

    # the registered SORS model loads without pickle in a fresh process and predicts logits on 2 images
    sors_model = json.loads((tmp_path / "models" / "smoke" / "sors.json").read_text())["registered_model"]
    probe = (
        "import mlflow, numpy as np; "
        f"m = mlflow.pyfunc.load_model('models:/{sors_model['name']}/{sors_model['version']}'); "
        "assert m.metadata.signature is not None; "
        "print(m.predict(np.random.rand(2, 1, 28, 28).astype(np.float32)).shape)"
    )
    env = dict(
        os.environ,
        MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
        MLFLOW_TRACKING_URI=mlflow_server,
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(2, 10)"

    # what the UI shows, through the server's REST API
    view = mlflow_view.sweep_view(mlflow_server, "smoke")
    assert view["kind"] == "custom_model_development" and sorted(view["children"]) == ["lenet5", "sors"]
    assert "report/accuracy_vs_eps.png" in view["plots"]
    assert {name: m["name"] for name, m in view["models"].items()} == {"lenet5": "smoke.lenet5", "sors": "smoke.sors"}

    # sors report re-renders from the store
    out = tmp_path / "report"
    assert (
        cli.main(
            [
                "report",
                "smoke",
                "--results-dir",
                str(tmp_path),
                "--tracking-uri",
                mlflow_server,
                "--out",
                str(out),
                "--no-mlflow",
            ]
        )
        == 0
    )
    markdown = (out / "table.md").read_text()
    assert "| LeNet-5 |" in markdown and "| SORS |" in markdown and "PGD 50/255" in markdown
    assert (out / "gradient_angles.png").stat().st_size > 0


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_sweep_evaluates_a_model_another_sweep_trained_from_the_same_config(
    ray_session, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    from pipeline import sweep as sweep_lib
    from pipeline.store.records import load_record
    from tests.faults import write_preset

    same = {"model.name": "lenet5"}
    first = write_preset(tmp_path / "first.yaml", "first", [{"name": "a", "label": "LeNet-5", "set": same}])
    second = write_preset(
        tmp_path / "second.yaml",
        "second",
        [
            {"name": "b", "label": "LeNet-5 again", "set": same},
            {"name": "c", "label": "LeNet-5 seed 1", "set": dict(same, **{"train.seed": 1})},
        ],
    )
    opts = sweep_lib.SweepOptions(results_dir=str(tmp_path / "results"), tracking_uri=mlflow_server, progress=False)
    sweep_lib.run_sweep(presets.build_sweep(str(first)), opts)
    origin = load_record(opts.results_dir, "first", "a")

    summary = sweep_lib.run_sweep(presets.build_sweep(str(second)), opts)
    lent, trained = (load_record(opts.results_dir, "second", t) for t in ("b", "c"))
    assert lent["reused_from"] == "first/a" and lent["label"] == "LeNet-5 again"
    assert (lent["checkpoint_uri"], lent["checkpoint_sha256"]) == (
        origin["checkpoint_uri"],
        origin["checkpoint_sha256"],
    )
    assert not list((tmp_path / "results" / "ray").glob("second.b*")), "the lent model was trained again"
    assert trained.reused_from is None and trained["checkpoint_sha256"] != origin["checkpoint_sha256"]
    assert load_record(opts.results_dir, "first", "a") == origin  # the lender is left as it was
    # the loan is evaluated and tracked as this sweep's own trial: its rows and its run (the registered model
    # stays the lender's). Its cells are the lender's (same checkpoint, attack and protocol: the same ids).
    rows = [r for r in summary.rows if r["trial"] == "b"]
    assert {r["attack"] for r in rows} == {"none", "fgsm"} and {r["model"] for r in rows} == {"LeNet-5 again"}
    stored = {r["cell_id"]: r for r in results.read_rows(tmp_path / "results" / "cells")}
    assert all(
        stored[r["cell_id"]]["sweep"] == "first" and stored[r["cell_id"]]["accuracy"] == r["accuracy"] for r in rows
    )
    assert (
        cli.main(
            ["report", "second", "--results-dir", opts.results_dir, "--no-mlflow", "--out", str(tmp_path / "report")]
        )
        == 0
    )
    assert "| LeNet-5 again |" in (tmp_path / "report" / "table.md").read_text()
    assert lent["evaluated"] and lent["mlflow_run_id"] not in (None, origin["mlflow_run_id"])
    run = MlflowClient(mlflow_server).get_run(lent["mlflow_run_id"])
    assert run.info.run_name == "b" and run.data.metrics["clean_eval_acc"] == pytest.approx(
        [r for r in rows if r["attack"] == "none"][0]["accuracy"]
    )
    assert lent["registered_model"] == origin["registered_model"]  # one checkpoint, one registered version
