"""The results row, defined once: every column of a cell's Parquet row with its type, and for the columns
that hold a measurement the :class:`sors.evaluation.CellResult` field it round-trips to.

:func:`tasks.cells.make_row` and :func:`tasks.cells.row_to_result` and the Parquet schema
(:mod:`pipeline.store.results`) are all derived from :data:`COLUMNS`, so a new column is one entry here
(plus, for a measurement, its ``CellResult`` field) and a test. Kinds are plain names, so this module needs
no pyarrow: ``string``, ``int32``, ``int64``, ``float64``, ``bool``, ``timestamp`` (UTC), ``json`` (a
mapping stored as JSON text) and ``list<K>`` for a list of kind ``K``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 2  # 2: per-example outcomes, exact-or-sampled worst case over paths, node_id


@dataclass(frozen=True)
class Column:
    """One column of the results row. ``result_field``: the ``CellResult`` field it stores (None: a fact of
    the cell's spec or checkpoint); ``partition``: a hive partition key (a folder level, not in the file);
    ``since``: the schema version that added it (older rows read it as null)."""

    name: str
    kind: str
    result_field: str | None = None
    partition: bool = False
    since: int = 1


def _result(name: str, kind: str, since: int = 1) -> Column:
    return Column(name, kind, result_field=name, since=since)


COLUMNS: tuple[Column, ...] = (
    Column("cell_id", "string"),
    Column("schema_version", "int32"),
    Column("sweep", "string"),
    Column("trial", "string"),
    Column("variant", "string"),
    Column("model", "string"),
    Column("arch", "string"),
    Column("lambda", "float64"),
    Column("n_ops", "int32"),
    Column("paths_per_step", "int32"),
    Column("average_paths", "int32"),
    _result("norm", "string"),
    Column("eps", "float64", result_field="eps"),
    _result("steps", "int32"),
    _result("eot_samples", "int32"),
    _result("repeats", "int32"),
    Column("seed", "int64"),
    Column("role", "string"),
    _result("n", "int64"),
    _result("correct", "float64"),
    _result("accuracy", "float64"),
    _result("ci_low", "float64"),
    _result("ci_high", "float64"),
    _result("all_path_accuracy", "float64"),
    _result("all_path_exact", "bool", since=2),
    _result("all_path_count", "int64", since=2),
    _result("example_index", "list<int64>", since=2),
    _result("example_correct", "list<float64>", since=2),
    _result("example_correct_min", "list<float64>", since=2),
    _result("sanity_flags", "list<string>"),
    _result("seconds", "float64"),
    _result("attack_spec", "json"),
    _result("extra", "json"),
    Column("checkpoint_uri", "string"),
    Column("checkpoint_sha256", "string"),
    Column("config_hash", "string"),
    Column("mlflow_run_id", "string"),
    Column("code_version", "string"),
    Column("created_at", "timestamp"),
    Column("node_id", "string", since=2),  # the Ray node that evaluated the cell (set by the fan-out)
    Column("dataset", "string", partition=True),
    Column("attack", "string", result_field="attack", partition=True),
)
BY_NAME = {c.name: c for c in COLUMNS}
FILE_COLUMNS = tuple(c for c in COLUMNS if not c.partition)  # what one cell file holds, in order
PARTITION_COLUMNS = tuple(c.name for c in COLUMNS if c.partition)
_SCALARS = {"string": str, "int32": int, "int64": int, "float64": float, "bool": bool}


def encode(kind: str, value: Any) -> Any:
    """``value`` as the plain Python value a column of ``kind`` stores (None stays None; bool never None)."""
    if kind == "json":
        return json.dumps(value or {}, sort_keys=True, default=str)
    if kind.startswith("list<"):
        inner = _SCALARS[kind[5:-1]]
        return [inner(v) for v in (value or [])]
    if kind == "bool":
        return bool(value)
    if value is None or kind == "timestamp":
        return value
    return _SCALARS[kind](value)


def decode(kind: str, value: Any) -> Any:
    """The inverse of :func:`encode`, tolerant of older rows (a missing list or JSON column reads empty)."""
    if kind == "json":
        return json.loads(value or "{}")
    if kind.startswith("list<"):
        inner = _SCALARS[kind[5:-1]]
        return [inner(v) for v in (value or [])]
    return encode(kind, value)


def result_values(result: Any) -> dict[str, Any]:
    """The measurement columns of a row from a ``CellResult`` (every column with a ``result_field`` except
    the partition and spec-owned ones, which the cell's spec states)."""
    owned_by_spec = {"attack", "eps"}
    return {
        c.name: encode(c.kind, getattr(result, c.result_field))
        for c in COLUMNS
        if c.result_field and c.name not in owned_by_spec
    }


def result_fields(row: dict) -> dict[str, Any]:
    """``{CellResult field: value}`` from a stored row: every column with a ``result_field``, decoded."""
    return {c.result_field: decode(c.kind, row.get(c.name)) for c in COLUMNS if c.result_field}


def check_complete(row: dict) -> dict:
    """``row`` when it has exactly the columns of :data:`COLUMNS` (``node_id`` may be left to the fan-out);
    a programming error otherwise -- a column added here but not filled, or filled but not declared."""
    missing = {c.name for c in COLUMNS} - set(row) - {"node_id"}
    extra = set(row) - {c.name for c in COLUMNS}
    if missing or extra:
        raise AssertionError(f"results row: missing {sorted(missing)}, undeclared {sorted(extra)}")
    return row
