"""The results store: a hive-partitioned Parquet dataset, one file (one row) per evaluation cell.

Layout: ``<root>/dataset=<name>/attack=<attack>/<cell_id>.parquet``. Each file is written under a
temporary name in the same folder and renamed into place, so readers never see half a file and a
cell is either finished or absent. Because the file name is the content-addressed cell id, a rerun
that finds the file skips the cell, and rewriting a cell (e.g. to add cross-cell sanity flags)
replaces its row instead of adding one. ``dataset`` and ``attack`` live in the path (hive style),
not in the files. The columns are documented in README's "Results: the Parquet dataset" section.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tasks import cells as cells_lib
from tasks import row_schema
from tasks.cells import CellSpec
from tasks.row_schema import SCHEMA_VERSION

PARTITION_KEYS = row_schema.PARTITION_COLUMNS  # hive folders: dataset=*/attack=*
PARTITIONING = pads.partitioning(pa.schema([("dataset", pa.string()), ("attack", pa.string())]), flavor="hive")

_ARROW = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "json": pa.string(),
}


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a :mod:`tasks.row_schema` column kind."""
    return pa.list_(arrow_type(kind[5:-1])) if kind.startswith("list<") else _ARROW[kind]


# Columns stored in every file, in order (the partition columns are added back on read): tasks.row_schema's.
FILE_SCHEMA = pa.schema(
    [(c.name, arrow_type(c.kind)) for c in row_schema.FILE_COLUMNS],
    metadata={"sors.schema_version": str(SCHEMA_VERSION)},
)

SCHEMA = pa.schema(
    list(FILE_SCHEMA) + [pa.field(k, pa.string()) for k in PARTITION_KEYS], metadata=FILE_SCHEMA.metadata
)


class ResultsError(ValueError):
    """A cell file that cannot be read (truncated, corrupt): the one-line message names the file."""


def unreadable(path: str | os.PathLike, err: BaseException | None = None) -> ResultsError:
    """The error for an unreadable cell file, saying how to recover (the cell is recomputed once gone)."""
    why = f" ({type(err).__name__})" if err is not None else ""
    return ResultsError(
        f"{path}: unreadable Parquet cell file, truncated or corrupt{why}; delete it and rerun to recompute that cell"
    )


def _safe(value: str) -> str:
    """A partition value usable in a path (attack and data set names are identifiers already)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in str(value))


def cell_path(root: str | os.PathLike, dataset: str, attack: str, cell_id: str) -> Path:
    """Where the row of a cell lives."""
    return Path(root) / f"dataset={_safe(dataset)}" / f"attack={_safe(attack)}" / f"{cell_id}.parquet"


def spec_path(root: str | os.PathLike, spec: CellSpec) -> Path:
    """:func:`cell_path` for a :class:`CellSpec`."""
    return cell_path(root, spec.dataset, spec.attack.name, spec.cell_id)


def is_done(root: str | os.PathLike, spec: CellSpec) -> bool:
    """True when the cell's row is already in the store."""
    return spec_path(root, spec).is_file()


def write_row(root: str | os.PathLike, row: dict) -> Path:
    """Write one cell row atomically (temporary name in the same folder, then rename). Returns the path."""
    path = cell_path(root, row["dataset"], row["attack"], row["cell_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: row.get(k) for k in FILE_SCHEMA.names}], schema=FILE_SCHEMA)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed write leaves nothing behind
    return path


def remove_stale_temporaries(root: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Delete the temporary cell files (``.<cell>.<id>.tmp``) that a killed writer left behind and
    nobody has touched for ``older_than_s`` seconds (a live writer renames its file within seconds).
    Readers skip them anyway; this keeps the store tidy. Returns how many were removed."""
    cutoff, removed = time.time() - older_than_s, 0
    for tmp in Path(root).glob("dataset=*/attack=*/.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # its writer finished or another cleaner got there first
            continue
    return removed


def read_row(path: str | os.PathLike) -> dict:
    """One cell file as a row dict, partition values restored from its path."""
    path = Path(path)
    try:
        row = pq.read_table(path, schema=FILE_SCHEMA).to_pylist()[0]
    except (pa.ArrowException, OSError, IndexError) as err:
        raise unreadable(path, err) from None
    row["attack"] = path.parent.name.split("=", 1)[1]
    row["dataset"] = path.parent.parent.name.split("=", 1)[1]
    return row


def files(root: str | os.PathLike) -> list[Path]:
    """Every finished cell file (temporary files excluded), sorted."""
    root = Path(root)
    return sorted(p for p in root.glob("dataset=*/attack=*/*.parquet") if not p.name.startswith("."))


def read_table(root: str | os.PathLike, filter_expr=None) -> pa.Table:
    """All rows as an Arrow table with the documented schema (empty table when nothing is stored)."""
    paths = files(root)
    if not paths:
        return SCHEMA.empty_table()
    dataset = pads.dataset(
        [str(p) for p in paths],
        schema=FILE_SCHEMA.append(pa.field("dataset", pa.string())).append(pa.field("attack", pa.string())),
        format="parquet",
        partitioning=PARTITIONING,
        partition_base_dir=str(Path(root)),
    )
    try:
        table = dataset.to_table(filter=filter_expr)
    except (pa.ArrowException, OSError) as err:
        bad = next((p for p in paths if str(p) in str(err)), None) or next((p for p in paths if not is_intact(p)), root)
        raise unreadable(bad, err) from None
    return table.select(SCHEMA.names)


def is_intact(path: Path) -> bool:
    """Cheap check that a Parquet file is whole: it starts and ends with the ``PAR1`` magic bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            return head == b"PAR1" and handle.read(4) == b"PAR1"
    except OSError:
        return False


def read_rows(root: str | os.PathLike, sweep: str | None = None) -> list[dict]:
    """Rows as dicts, optionally only those of one sweep."""
    filter_expr = (pads.field("sweep") == sweep) if sweep else None
    return read_table(root, filter_expr).to_pylist()


def rows_for(root: str | os.PathLike, specs: Iterable[CellSpec]) -> list[dict]:
    """The stored rows of the given cells (missing cells skipped), in the order given, each with its spec's
    context (sweep, trial, row name, run): a cell first stored for another sweep is shown as this one's."""
    return [dict(read_row(spec_path(root, s)), **cells_lib.context_of(s)) for s in specs if is_done(root, s)]


def cell_contexts(specs: Iterable[CellSpec]) -> dict[str, dict]:
    """``{cell_id: where it is stored + its context}`` for a model record: lets ``sors report SWEEP`` find the
    sweep's cells that another sweep stored first (:func:`rows_of_records`)."""
    return {s.cell_id: {"dataset": s.dataset, "attack": s.attack.name, **cells_lib.context_of(s)} for s in specs}


def rows_of_records(root: str | os.PathLike, records: Iterable[dict], skip: set[str]) -> list[dict]:
    """The stored rows of the cells the records list (``cells``: :func:`cell_contexts`), ids in ``skip``
    left out, each with the record's context."""
    rows = []
    for record in records:
        for cell_id, where in (record.get("cells") or {}).items():
            path = cell_path(root, where["dataset"], where["attack"], cell_id)
            if cell_id not in skip and path.is_file():
                context = {k: v for k, v in where.items() if k not in ("dataset", "attack")}
                rows.append(dict(read_row(path), **context))
                skip.add(cell_id)
    return rows


def update_flags(root: str | os.PathLike, rows: list[dict], extra_flags: dict[str, list[str]]) -> int:
    """Add sanity flags to stored rows (``{cell_id: [flag, ...]}``); rewrites each changed cell in
    place (same file name: still one row per cell). Returns the number of rows changed."""
    changed = 0
    for row in rows:
        new = [f for f in extra_flags.get(row["cell_id"], []) if f not in row["sanity_flags"]]
        if new:  # the stored row, not ``row``: that may show the cell with another sweep's context
            stored = read_row(cell_path(root, row["dataset"], row["attack"], row["cell_id"]))
            write_row(root, dict(stored, sanity_flags=list(stored["sanity_flags"]) + new))
            changed += 1
    return changed
