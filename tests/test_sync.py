"""`sors sync` and MLflow outages: a sweep whose tracking server goes away mid-run is backfilled by
`sors sync`; a nightly whose MLflow goes away fails and names the sync command (local Ray, a real
MLflow server behind a TCP proxy that takes it away)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline import cli
from pipeline.store.records import ModelRecord
from sors import config as config_lib
from sors import train as train_lib
from tests.faults import TcpProxy, store_rows, write_preset

pytestmark = pytest.mark.timeout(400)


# ---------------------------------------------------------------- 4. MLflow unreachable during a sweep


@pytest.mark.fault
@pytest.mark.ray
def test_mlflow_outage_during_a_sweep_is_backfilled_by_sync(ray_session, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.store.records import load_record

    preset = write_preset(
        tmp_path / "one.yaml",
        "outage",
        [{"name": "lenet5", "label": "LeNet-5", "set": {"model.name": "lenet5", "train.epochs": 1}}],
    )
    results_dir = tmp_path / "results"
    proxy = TcpProxy(mlflow_server)

    # the server goes away once the trial has started training (after the run was created)
    watcher = proxy.down_when(
        lambda: any(p.name.startswith("outage.") for p in (results_dir / "ray").glob("*")),
        "the trial to start training",
    )
    code = cli.main(
        ["sweep", str(preset), "--results-dir", str(results_dir), "--tracking-uri", proxy.uri, "--no-progress"]
    )
    out, err = capsys.readouterr()
    watcher.join(timeout=5)

    # the work is done and on disk; the CLI says clearly that tracking failed and how to fix it
    assert code == 1, err
    message = [line for line in err.splitlines() if line.startswith("sors sweep: tracking failed")]
    assert len(message) == 1 and "sors sync outage" in message[0] and "checkpoints and Parquet" in message[0]
    record = load_record(str(results_dir), "outage", "lenet5")
    assert record["evaluated"] and record["tracking"]["status"] == "incomplete"
    assert train_lib.read_checkpoint(record["checkpoint_uri"])["epoch"] == 1
    rows = store_rows(results_dir)
    assert len(rows) == 2
    trial_files = list((results_dir / "ray").rglob("params.*"))
    assert trial_files and not any(
        proxy.uri.encode() in f.read_bytes() for f in trial_files
    )  # the URI may hold a password

    proxy.up()
    assert cli.main(["sync", "--results-dir", str(results_dir), "--tracking-uri", proxy.uri]) == 0
    assert "1 of 1 run(s) up to date" in capsys.readouterr().out

    client = MlflowClient(mlflow_server)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert set(config_lib.flat_dict(config_lib.from_dict(record["config"]))) <= set(run.data.params)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    for row in rows:
        key = "clean_eval" if row["attack"] == "none" else f"{row['attack']}_eps{row['eps']:.3f}"
        assert run.data.metrics[f"{key}_acc"] == pytest.approx(row["accuracy"])
    assert {"cells", "checkpoint"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    parent = run.data.tags["mlflow.parentRunId"]  # the sweep's run holds the report
    assert "report/table.md" in {a.path for a in client.list_artifacts(parent, "report")}
    assert run.outputs.model_outputs and client.get_model_version("outage.lenet5", "1").run_id == run.info.run_id
    assert {r["mlflow_run_id"] for r in store_rows(results_dir)} == {run.info.run_id}
    assert load_record(str(results_dir), "outage", "lenet5")["tracking"]["status"] == "complete"

    # idempotent: a second sync finds nothing to log
    assert cli.main(["sync", "--all", "--results-dir", str(results_dir), "--tracking-uri", proxy.uri]) == 0
    assert "logged 0 metric(s), 0 artifact(s)" in capsys.readouterr().out
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]


@pytest.mark.fault
@pytest.mark.ray
def test_mlflow_outage_during_a_nightly_fails_it_and_names_the_sync_command(
    ray_session, mlflow_server, tmp_path, capsys
):
    import yaml

    from pipeline import nightly

    config = write_preset(
        tmp_path / "night.yaml", "night", [{"name": "lenet5", "label": "LeNet-5", "set": {"model.name": "lenet5"}}]
    )
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "nightly": {"min_drop": 2.0}}))
    results_dir = tmp_path / "results"
    proxy = TcpProxy(mlflow_server)

    # MLflow goes away once the trial trains: the night's models and cells finish untracked
    watcher = proxy.down_when(
        lambda: any("lenet5" in p.name for p in results_dir.glob("nightly/night/runs/*/*/ray/*")),
        "the nightly's trial to start training",
    )
    code = nightly.main(
        ["--config", str(config), "--results-dir", str(results_dir), "--tracking-uri", proxy.uri, "--no-progress"]
    )
    out, err = capsys.readouterr()
    watcher.join(timeout=5)
    proxy.up()

    assert code == 1, out + err  # no regression (a first run accepts itself), but the MLflow record is partial
    assert out.strip().splitlines()[-1].startswith("sors nightly: exit 1: TRACKING INCOMPLETE: 1 run(s)")
    message = [line for line in err.splitlines() if line.startswith("sors nightly: tracking failed")]
    assert len(message) == 1 and "sors sync" in message[0]
    run_json = next(results_dir.glob("nightly/night/runs/*/*/run.json"))
    run = json.loads(run_json.read_text())
    assert (run["status"], run["exit_code"], run["summary"]["tracking_missed"]) == ("tracking-incomplete", 1, 1)
    # the advice works: the sync it names backfills the night's model run from the run folder
    assert cli.main(["sync", "--results-dir", str(run_json.parent), "--tracking-uri", proxy.uri]) == 0
    assert "1 of 1 run(s) up to date" in capsys.readouterr().out


# ---------------------------------------------------------------- runs stay true to their model and content


def _checkpoint(path, seed: int):
    """An untrained SORS-LeNet-5 checkpoint (weights from ``seed``): ``(path, sha256, config)``."""
    import torch

    from tasks import storage

    cfg = config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(),
            {"model.name": "sors_lenet5", "data.n_train": 64, "data.n_test": 32, "train.epochs": 0},
        )
    )
    torch.manual_seed(seed)
    train_lib.save_checkpoint(path, train_lib.new_state(cfg), cfg)
    return path, storage.file_sha256(path), cfg


def _cell_row(sha: str, accuracy: float) -> dict:
    """A stored cell's row of trial ``sors`` of sweep ``s`` (always the same cell id)."""
    from datetime import datetime, timezone

    return {
        "cell_id": "c" * 16,
        "schema_version": 2,
        "dataset": "fashion_mnist",
        "attack": "pgd",
        "eps": 0.2,
        "n": 32,
        "correct": accuracy * 32,
        "accuracy": accuracy,
        "ci_low": accuracy - 0.1,
        "ci_high": accuracy + 0.1,
        "sanity_flags": [],
        "sweep": "s",
        "trial": "sors",
        "variant": "sors",
        "seed": 0,
        "checkpoint_sha256": sha,
        "created_at": datetime.now(timezone.utc),
    }


def test_sync_compares_content_and_a_retrained_model_never_lands_on_the_old_models_run(tmp_path, capsys):
    """The cell of a run is rewritten with another value, then the model is retrained (same trial and
    config, new weights) while its record still names the old run -- as a nightly's copied record or a
    rerun sweep would: the value and the file are logged again, and the new model gets a run of its own."""
    from mlflow.tracking import MlflowClient

    from pipeline.store import records
    from pipeline.tracking import sync

    results_dir = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    path, sha, cfg = _checkpoint(tmp_path / "a.pt", seed=0)
    record = ModelRecord.from_dict(
        {
            "sweep": "s",
            "trial": "sors",
            "label": "SORS",
            "config": config_lib.to_dict(cfg),
            "config_hash": config_lib.config_hash(cfg),
            "run_name": "s.sors",
            "checkpoint_uri": str(path),
            "checkpoint_sha256": sha,
            "history": [{"epoch": 1, "loss": 1.5}],
            "evaluated": True,
        }
    )
    records.save_record(str(results_dir), record)
    sync.track(uri, results_dir, record, rows=[_cell_row(sha, 0.25)])
    first = records.load_record(str(results_dir), "s", "sors")
    run_id = first["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["pgd_eps0.200_acc"] == pytest.approx(0.25)

    # the same cell, rewritten with another result: `sors sync --all` logs the new value and file
    sync.track(uri, results_dir, first, rows=[_cell_row(sha, 0.5)])
    assert client.get_run(run_id).data.metrics["pgd_eps0.200_acc"] == pytest.approx(0.5)
    local = client.download_artifacts(
        run_id, "cells/dataset=fashion_mnist/attack=pgd/" + "c" * 16 + ".parquet", str(tmp_path / "down")
    )
    assert pq_accuracy(local) == pytest.approx(0.5)

    # retrained: new weights under the same trial and config, the record still naming the old run
    new_path, new_sha, _ = _checkpoint(tmp_path / "b.pt", seed=1)
    assert new_sha != sha
    retrained = dataclasses.replace(
        first, checkpoint_uri=str(new_path), checkpoint_sha256=new_sha, registered_model=None
    )
    sync.track(uri, results_dir, retrained, rows=[_cell_row(new_sha, 0.75)])
    new_run = records.load_record(str(results_dir), "s", "sors")["mlflow_run_id"]
    assert new_run != run_id
    old = client.get_run(run_id)
    assert old.data.metrics["pgd_eps0.200_acc"] == pytest.approx(0.5) and old.data.tags["sors.checkpoint_sha256"] == sha
    assert client.get_run(new_run).data.metrics["pgd_eps0.200_acc"] == pytest.approx(0.75)
    versions = {str(v.version): v.run_id for v in client.search_model_versions("name = 's.sors'")}
    assert versions == {"1": run_id, "2": new_run}
    # nothing changed: another sync (rows read back from the store, as `sors sync` does) logs nothing
    again = sync.track(uri, results_dir, records.load_record(str(results_dir), "s", "sors"))
    assert again == {"metrics": 0, "artifacts": 0, "model": 0}


def pq_accuracy(path) -> float:
    """The accuracy stored in a cell file."""
    import pyarrow.parquet as pq

    return pq.read_table(path).column("accuracy").to_pylist()[0]
