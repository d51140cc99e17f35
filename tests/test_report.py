"""Pooling a cell over seeds (pipeline.report.pooled): seeds re-score the same images, so pooling
must not treat repeated scorings of one image as more examples. Rows come from real scorings of a
SORS-LeNet-5 super-network on real Fashion-MNIST test images, read back from Parquet."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline.report import pooled
from sors import data as data_lib
from sors import evaluation
from sors.metrics import wilson_interval
from sors.models.factory import build_from_config
from tests.conftest import make_config

N_IMAGES = 200


@pytest.fixture(scope="module")
def scored_rows(tmp_path_factory):
    """Clean cells of one super-network on the first 200 test images (split indices 0..199) for
    seeds 0 and 1 (fresh path draws per seed), as v2 rows read back from a Parquet file."""
    images, labels = data_lib.load("fashion_mnist", "test")
    images, labels = images[:N_IMAGES], labels[:N_IMAGES]
    torch.manual_seed(0)
    model = build_from_config(make_config(model__name="sors_lenet5")).eval()
    rows = []
    for seed in (0, 1):
        per_example = evaluation.score(model, images, labels, repeats=5, seed=seed)
        accuracy = float(per_example.mean())
        low, high = wilson_interval(accuracy, N_IMAGES)
        rows.append(
            {
                "cell_id": f"clean-{seed}",
                "schema_version": 2,
                "seed": seed,
                "n": N_IMAGES,
                "correct": float(per_example.sum()),
                "accuracy": accuracy,
                "ci_low": low,
                "ci_high": high,
                "all_path_accuracy": None,
                "example_index": list(range(N_IMAGES)),
                "example_correct": per_example.double().tolist(),
            }
        )
    path = tmp_path_factory.mktemp("rows") / "rows.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return pd.read_parquet(path).to_dict("records")


def _width(cell) -> float:
    return cell.ci_high - cell.ci_low


def test_two_seeds_of_the_same_images_do_not_narrow_the_interval(scored_rows):
    first, second = scored_rows
    assert 0 < first["example_correct"].mean() < 1 and first["accuracy"] != second["accuracy"]  # draws differ
    cell = pooled(scored_rows)
    assert cell.n == N_IMAGES  # 200 distinct images, not 400 scorings
    assert cell.accuracy == pytest.approx((first["accuracy"] + second["accuracy"]) / 2)
    assert _width(cell) >= min(_width(pooled([r])) for r in scored_rows) - 1e-12
    twice_counted = wilson_interval(cell.accuracy, 2 * N_IMAGES)  # what summing n over seeds gave
    assert _width(cell) > 1.3 * (twice_counted[1] - twice_counted[0])


def test_seeds_on_different_images_do_pool_into_more_examples(scored_rows):
    first, second = scored_rows
    other = dict(second, example_index=[i + N_IMAGES for i in second["example_index"]])  # as if other images
    cell = pooled([first, other])
    assert cell.n == 2 * N_IMAGES and _width(cell) < min(_width(pooled([first])), _width(pooled([other])))


def test_rows_without_outcomes_count_the_images_of_one_row(scored_rows):
    v1 = [
        {k: v for k, v in r.items() if k not in ("example_index", "example_correct")} | {"schema_version": 1}
        for r in scored_rows
    ]
    cell = pooled(v1)
    assert cell.n == N_IMAGES and cell.accuracy == pytest.approx(pooled(scored_rows).accuracy)
    mixed = pooled([scored_rows[0], v1[1]])  # one v2 and one v1 row: the v1 rule
    assert mixed.n == N_IMAGES
