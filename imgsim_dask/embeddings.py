"""Bring your own embeddings: a source made from row vectors users already have (CLIP or any
other model), so that they match, dedupe and export like extracted ones.

The vectors come from a `.npy` file, a Zarr array or a Parquet file (one list column, or
all-numeric columns), row i being row i; an optional table (CSV or Parquet, one row per
vector) gives their fields. Rows are L2-normalised; a row with a non-finite value or no
length is kept as `bad_vector` with NaN features, so every input row has a status.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from .descriptor import IMPORTED as IMPORTED_DESCRIPTOR
from .errors import InputError, OptionError, opt
from .options import DEFAULT_STORE
from .schema import OK, RESERVED_COLUMNS, ROW, STATUS_COLUMNS, SourceMeta, SourcePlan
from .store import (
    Source,
    SourceAppender,
    SourceWriter,
    check_name,
    check_store,
    check_writable,
    read_parquet,
)

BAD_VECTOR = "bad_vector"
IMPORTED = "imported"  # the model name of a source made from vectors
ID_COL = "id"  # the id field of a source imported without a table: the row number


def import_features(
    name: str,
    features: str | os.PathLike,
    store: str | os.PathLike = DEFAULT_STORE,
    *,
    rows: str | os.PathLike | None = None,
    id_col: str | None = None,
    descriptor: str = IMPORTED,
    threshold: float | None = None,
    partition_rows: int = 4096,
    overwrite: bool = False,
    append: bool = False,
) -> Source:
    """Make source `name` from the row vectors in `features` (and the fields in `rows`).

    `descriptor` names what made the vectors (`clip-vit-b32`): only sources of the same
    descriptor and dimension are matched together. `threshold` becomes the source's default
    threshold; without one, `match` needs `threshold` or `top_k`. `append=True` adds the
    rows to the source `name` made before (ids continue after its last row), with its
    descriptor, fields and partitions.
    """
    if append:
        return _append(name, features, store, rows, id_col, descriptor, threshold)
    check_store(store)
    check_name(name)
    if partition_rows < 1:
        raise OptionError(f"{opt('partition_rows')} must be at least 1, got {partition_rows}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise OptionError(f"{opt('threshold')} {threshold} is outside [-1, 1] (cosine similarity)")
    started = time.perf_counter()
    array = open_vectors(features)
    n, dim = array.shape
    table = _fields(rows, n, id_col)
    fields = [c for c in table.columns if c != ROW]
    ident = id_col or fields[0]
    check_writable(store)
    plan = SourcePlan(
        csv=str(Path(features).resolve()) if "://" not in str(features) else str(features),
        rows=n,
        dim=dim,
        partition_rows=partition_rows,
        model=descriptor,
        weights=f"{IMPORTED}: {descriptor}",
        fetch={},
        fields=fields,
        url_col="",
        id_col=ident,
        delimiter=",",
        header=True,
    )
    writer = SourceWriter(store, name, plan, overwrite=overwrite)
    counts: dict[str, int] = {}
    for k, start in enumerate(range(0, n, partition_rows)):
        stop = min(n, start + partition_rows)
        block, part = _partition(array, table, start, stop, counts)
        writer.write_partition(k, block, part)
    seconds = time.perf_counter() - started
    return writer.finish(
        SourceMeta(
            name=name,
            model=descriptor,
            dim=dim,
            threshold=threshold,  # None: no default threshold
            descriptor=IMPORTED_DESCRIPTOR,
            image_size=None,
            weights=f"{IMPORTED}: {descriptor}",
            weights_sha256="",
            csv=plan.csv,
            fields=fields,
            url_col="",
            id_col=ident,
            rows=n,
            status_counts=dict(sorted(counts.items())),
            partition_rows=partition_rows,
            batch_size=0,
            runtime=[],
            seconds=round(seconds, 3),
            images_per_second=None,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            versions={},
        )
    )


def _append(
    name: str,
    features: str | os.PathLike,
    store: str | os.PathLike,
    rows: str | os.PathLike | None,
    id_col: str | None,
    descriptor: str,
    threshold: float | None,
) -> Source:
    """`import_features(..., append=True)`: the rows added to source `name`."""
    check_store(store)
    array = open_vectors(features)
    n, dim = array.shape
    origin = str(Path(features).resolve()) if "://" not in str(features) else str(features)
    appender = SourceAppender(store, name, origin, n)
    meta = appender.before
    if dim != meta.dim or descriptor not in (IMPORTED, meta.model):
        raise InputError(
            f"{name} holds {meta.dim}-d {meta.model} vectors; cannot append {dim}-d "
            f"{descriptor if descriptor != IMPORTED else ''} vectors".replace("  ", " ")
        )
    if threshold is not None:
        raise OptionError(f"an append keeps {name}'s threshold; leave out {opt('threshold')}")
    table = _fields(rows, n, id_col)  # (the id column stays the source's)
    fields = [c for c in table.columns if c != ROW]
    if fields != meta.fields:
        raise InputError(
            f"{name} has the fields {', '.join(meta.fields)}; the rows to append have "
            f"{', '.join(fields)}: give a table with the same columns"
        )
    table[ROW] += appender.first_row
    if rows is None:  # the id is the row number
        table[ID_COL] = table[ROW]
    check_writable(store)
    appender.start()
    counts: dict[str, int] = {}
    for k, start, stop in appender.pieces():
        first = start - appender.first_row
        block, part = _partition(array, table, first, first + stop - start, counts)
        appender.write(k, block, part)
    return appender.finish(counts)


def _partition(
    array: Any, table: pd.DataFrame, start: int, stop: int, counts: dict[str, int]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Rows `start:stop` of the vectors, normalised, and their row table; adds their
    statuses to `counts`."""
    block, status = normalised(np.asarray(array[start:stop], dtype=np.float32))
    part = table.iloc[start:stop].reset_index(drop=True)
    part["status"] = status
    part["error"] = [None if s == OK else "not finite, or of length 0" for s in status]
    for column in STATUS_COLUMNS[2:]:
        part[column] = None
    part["http_status"] = part["http_status"].astype("Int16")
    for column in ("bytes", "width", "height"):
        part[column] = part[column].astype("Int64")
    for value, count in zip(*np.unique(status, return_counts=True)):
        counts[str(value)] = counts.get(str(value), 0) + int(count)
    return block, part


def normalised(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to length 1, and each row's status: `bad_vector` (and NaN) where a value
    is not finite or the row has no length."""
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(block, axis=1)
    good = np.isfinite(block).all(axis=1) & np.isfinite(norms) & (norms > 0)
    out = np.full_like(block, np.nan)
    out[good] = block[good] / norms[good, None]
    return out, np.where(good, OK, BAD_VECTOR).astype(object)


def open_vectors(path: str | os.PathLike) -> Any:
    """The n x dim array in a `.npy` file, a Zarr array or a Parquet file, read lazily where
    the format allows; a one-line InputError for anything else."""
    text = os.fspath(path)
    try:
        if text.endswith(".npy"):
            array = np.load(text, mmap_mode="r")
        elif text.rstrip("/").endswith(".zarr"):
            array = zarr.open_array(text, mode="r")
        elif text.endswith(".parquet"):
            array = _parquet_vectors(read_parquet(Path(text)))
        else:
            raise InputError(f"{text}: give vectors as .npy, .zarr or .parquet")
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise InputError(f"{text}: cannot read vectors ({reason})") from None
    if len(array.shape) != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{text}: vectors must be a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{text}: vectors must be numbers, got {array.dtype}")
    return array


def _parquet_vectors(table: pd.DataFrame) -> np.ndarray:
    """One list column of equal-length vectors, or every column numeric."""
    if len(table.columns) == 1 and table[table.columns[0]].dtype == object:
        column = table[table.columns[0]]
        lengths = column.map(len)
        if lengths.nunique() != 1:
            raise ValueError(f"column {table.columns[0]!r} holds vectors of different lengths")
        return np.stack(column.to_numpy()).astype(np.float32)
    if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
        raise ValueError("a Parquet file of vectors needs one list column or numeric columns")
    return table.to_numpy(np.float32)


def _fields(rows: str | os.PathLike | None, n: int, id_col: str | None) -> pd.DataFrame:
    """The fields of the n rows (`row` first): read from `rows`, or just `id` = row number."""
    if rows is None:
        if id_col not in (None, ID_COL):
            raise OptionError(f"{opt('id_col')} {id_col!r} needs a table of fields ({opt('rows')})")
        return pd.DataFrame({ROW: np.arange(n), ID_COL: np.arange(n)})
    text = os.fspath(rows)
    try:
        if text.endswith(".parquet"):
            table = read_parquet(Path(text))
        elif text.endswith((".csv", ".tsv")):
            table = pd.read_csv(text, sep="\t" if text.endswith(".tsv") else ",", dtype=str)
        else:
            raise InputError(f"{text}: give the fields as .csv, .tsv or .parquet")
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise InputError(f"{text}: cannot read fields ({reason})") from None
    if len(table) != n:
        raise InputError(f"{text} has {len(table)} rows, the vectors {n}: one row per vector")
    clash = [c for c in table.columns if c in RESERVED_COLUMNS]
    if clash:
        raise InputError(f"{text}: column name {clash[0]!r} is reserved for the row table")
    if id_col is not None and id_col not in table.columns:
        raise OptionError(
            f"{opt('id_col')} {id_col!r} is not a column of {text} "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    table.insert(0, ROW, np.arange(n))
    return table.reset_index(drop=True)
