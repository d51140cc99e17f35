"""Inputs checked before anything runs (pipeline.preflight): truncated Parquet cells and checkpoints
are named in one line and nothing is touched; a pickle payload in a checkpoint is refused by every
command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.store import results
from pipeline.store.records import ModelRecord
from sors import config as config_lib
from tests.faults import tiny_checkpoint  # noqa: F401 -- a fixture

pytestmark = pytest.mark.timeout(400)


# ---------------------------------------------------------------- 5. truncated checkpoint or Parquet file


@pytest.fixture
def stored_results(tmp_path, tiny_checkpoint):
    """A results folder as a finished `sors sweep smoke` leaves it for trial lenet5, built without Ray:
    its checkpoint, model record and two evaluated cells (clean, FGSM) in the Parquet store."""
    from pipeline.plan import presets
    from pipeline.plan.cell_specs import cell_specs
    from pipeline.store.records import save_record
    from tasks import cells, storage

    results_dir = tmp_path / "results"
    ckpt = results_dir / "ray" / "smoke.lenet5" / "epoch_0001" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    trial = presets.build_sweep("smoke").trial("lenet5")
    record = ModelRecord.from_dict(
        {
            "sweep": "smoke",
            "trial": "lenet5",
            "label": trial.label,
            "variants": [],
            "config": config_lib.to_dict(trial.config),
            "config_hash": config_lib.config_hash(trial.config),
            "run_name": "smoke.lenet5",
            "checkpoint_uri": str(ckpt),
            "checkpoint_sha256": storage.file_sha256(ckpt),
            "mlflow_run_id": None,
            "history": [],
            "evaluated": True,
        }
    )
    save_record(str(results_dir), record)
    plan = presets.EvalPlan(clean=True, attacks=({"name": "fgsm"},), eps=(50 / 255,))
    for spec in cell_specs(trial, record, plan, "smoke")[:2]:
        _, row = cells.evaluate(spec)
        results.write_row(results_dir / "cells", row)
    return results_dir


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sors {command}: error: ") and "Traceback" not in out + err, err
    return lines[0]


@pytest.mark.fault
def test_truncated_parquet_cell_is_named_in_one_line_and_nothing_is_touched(stored_results, tmp_path, capsys):
    victim = results.files(stored_results / "cells")[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _snapshot(tmp_path)
    assert cli.main(["report", "--results-dir", str(stored_results), "--no-mlflow"]) == 2
    assert str(victim) in _one_line_error(capsys, "report")
    assert cli.main(["sweep", "smoke", "--results-dir", str(stored_results), "--no-progress"]) == 2
    line = _one_line_error(capsys, "sweep")
    assert str(victim) in line and "truncated or corrupt" in line and "delete it and rerun" in line
    assert _snapshot(tmp_path) == before  # no report, no new cell, no MLflow store, no Ray state


@pytest.mark.fault
def test_truncated_checkpoints_are_named_in_one_line_and_nothing_is_touched(stored_results, tmp_path, capsys):
    # `sors evaluate` on a truncated checkpoint
    cut = tmp_path / "cut.pt"
    cut.write_bytes(
        Path(json.loads((stored_results / "models/smoke/lenet5.json").read_text())["checkpoint_uri"]).read_bytes()[
            :3000
        ]
    )
    before = _snapshot(tmp_path)
    assert cli.main(["evaluate", str(cut), "--results-dir", str(tmp_path / "other")]) == 2
    assert f"{cut}: unreadable checkpoint (truncated or corrupt" in _one_line_error(capsys, "evaluate")
    assert _snapshot(tmp_path) == before and not (tmp_path / "other").exists()

    # a sweep whose finished trial's checkpoint was truncated after training
    record = json.loads((stored_results / "models/smoke/lenet5.json").read_text())
    ckpt = Path(record["checkpoint_uri"])
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    before = _snapshot(tmp_path)
    assert cli.main(["sweep", "smoke", "--resume", "--results-dir", str(stored_results), "--no-progress"]) == 2
    line = _one_line_error(capsys, "sweep")
    assert str(ckpt) in line and "truncated or changed" in line
    assert _snapshot(tmp_path) == before


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_a_checkpoint_is_refused_by_every_command(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "config": {}, "x": _Payload(marker)}, evil)
    assert cli.main(["evaluate", str(evil), "--results-dir", str(tmp_path / "results")]) == 2
    assert f"{evil}: refused to load" in _one_line_error(capsys, "evaluate")
    # ... as a teacher, and as the epoch checkpoint an interrupted trial would resume from
    assert cli.main(["train", "--set", f"train.teacher={evil}", "--results-dir", str(tmp_path / "results")]) == 2
    assert "refused to load" in _one_line_error(capsys, "train")
    from pipeline.cluster import trainer
    from pipeline.plan import presets

    trial = presets.build_sweep("smoke").trial("lenet5")
    run_dir = tmp_path / "results" / "ray" / trainer.run_name("smoke", "lenet5", trial.config)
    (run_dir / "epoch_0001").mkdir(parents=True)
    (run_dir / "epoch_0001" / "model.pt").write_bytes(evil.read_bytes())
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "epoch_0001"}})
    )
    assert cli.main(["sweep", "smoke", "--resume", "--results-dir", str(tmp_path / "results")]) == 2
    assert "refused to load" in _one_line_error(capsys, "sweep")
    assert not marker.exists()  # the payload never ran
