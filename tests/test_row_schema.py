"""The results row is defined once (tasks.row_schema.COLUMNS): the Parquet schema, make_row and
row_to_result all follow it, so a cell written and read back gives the same result it was made from."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest

from pipeline.store import results
from sors import config as config_lib
from sors import train as train_lib
from sors.config import AttackConfig
from sors.evaluation import CellResult
from tasks import cells as cells_lib
from tasks import row_schema, storage


def test_every_declared_column_is_stored_and_every_stored_column_declared():
    stored = set(results.SCHEMA.names)
    assert stored == {c.name for c in row_schema.COLUMNS}
    assert {c.result_field for c in row_schema.COLUMNS if c.result_field} <= {
        f.name for f in dataclasses.fields(CellResult)
    }


def test_a_cell_written_and_read_back_is_the_result_it_came_from(tmp_path):
    cfg = config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(),
            {"model.name": "sors_lenet5", "data.n_train": 32, "data.n_test": 8, "train.epochs": 0},
        )
    )
    checkpoint = train_lib.save_checkpoint(tmp_path / "m.pt", train_lib.fit(cfg), cfg)
    eval_cfg = dataclasses.replace(cfg.eval, n_examples=8, repeats=2, all_paths=2, batch_size=8)
    spec = cells_lib.CellSpec(
        checkpoint_uri=str(checkpoint),
        checkpoint_sha256=storage.file_sha256(checkpoint),
        dataset="fashion_mnist",
        attack=AttackConfig(name="pgd", eps=25 / 255, steps=2),
        eval=eval_cfg,
        sweep="s",
        trial="t",
    )
    result, row = cells_lib.evaluate(spec)
    path = results.write_row(tmp_path / "cells", row)
    assert pq.read_schema(path).names == [c.name for c in row_schema.FILE_COLUMNS]
    back = cells_lib.row_to_result(results.read_row(path))
    for field in dataclasses.fields(CellResult):
        if field.name == "seconds":
            continue
        want, got = getattr(result, field.name), getattr(back, field.name)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), field.name


def test_a_row_missing_a_declared_column_is_a_programming_error():
    with pytest.raises(AssertionError, match="missing"):
        row_schema.check_complete({"cell_id": "x"})
