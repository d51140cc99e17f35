"""`sors sync` and MLflow outages: a sweep whose tracking server goes away mid-run is backfilled by
`sors sync`; a nightly whose MLflow goes away fails and names the sync command (local Ray, a real
MLflow server behind a TCP proxy that takes it away)."""

from __future__ import annotations

import json

import pytest

from pipeline import cli
from sors import config as config_lib
from sors import train as train_lib
from tests.faults import TcpProxy, store_rows, write_preset

pytestmark = pytest.mark.timeout(400)


# ---------------------------------------------------------------- 4. MLflow unreachable during a sweep

@pytest.mark.fault
@pytest.mark.ray
def test_mlflow_outage_during_a_sweep_is_backfilled_by_sync(ray_session, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.records import load_record

    preset = write_preset(tmp_path / "one.yaml", "outage",
                          [{"name": "lenet5", "label": "LeNet-5", "set": {"model.name": "lenet5", "train.epochs": 1}}])
    results_dir = tmp_path / "results"
    proxy = TcpProxy(mlflow_server)

    # the server goes away once the trial has started training (after the run was created)
    watcher = proxy.down_when(lambda: any(p.name.startswith("outage.") for p in (results_dir / "ray").glob("*")),
                              "the trial to start training")
    code = cli.main(["sweep", str(preset), "--results-dir", str(results_dir), "--tracking-uri", proxy.uri,
                     "--no-progress"])
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
    assert trial_files and not any(proxy.uri.encode() in f.read_bytes() for f in trial_files)  # the URI may hold a password

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
def test_mlflow_outage_during_a_nightly_fails_it_and_names_the_sync_command(ray_session, mlflow_server, tmp_path,
                                                                             capsys):
    import yaml

    from pipeline import nightly

    config = write_preset(tmp_path / "night.yaml", "night",
                          [{"name": "lenet5", "label": "LeNet-5", "set": {"model.name": "lenet5"}}])
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "nightly": {"min_drop": 2.0}}))
    results_dir = tmp_path / "results"
    proxy = TcpProxy(mlflow_server)

    # MLflow goes away once the trial trains: the night's models and cells finish untracked
    watcher = proxy.down_when(lambda: any("lenet5" in p.name for p in results_dir.glob("nightly/night/runs/*/*/ray/*")),
                              "the nightly's trial to start training")
    code = nightly.main(["--config", str(config), "--results-dir", str(results_dir), "--tracking-uri", proxy.uri,
                         "--no-progress"])
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
