"""Ingest: read a CSV of image URLs with a Dask dataframe and fix every row's id before work starts.

The CSV is checked on the driver first (so a bad file fails in a second with one clear
line), then read by Dask in byte blocks. Block lengths are counted in a first cheap pass;
`plan_partitions` cuts the global row range into fixed-size partitions that are aligned
with the feature store's chunks, whatever the CSV block boundaries are.
"""

from __future__ import annotations

import csv
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass

import dask.dataframe as dd
import fsspec
import pandas as pd

from .errors import InputError

ROW_COLUMN = "row"
_SNIFF_BYTES = 64 * 1024
_OTHER_DELIMITERS = (";", "\t", "|", ",")


@dataclass(frozen=True)
class CsvSource:
    """A validated CSV: where it is, how to parse it, and which columns matter."""

    path: str
    delimiter: str
    header: bool
    names: tuple[str, ...]  # every column of the file, in order
    keep: tuple[str, ...]  # the columns that travel to the outputs
    url_col: str
    id_col: str

    @property
    def base_dir(self) -> str:
        """Directory that relative image paths in the CSV are resolved against."""
        return os.path.dirname(os.path.abspath(self.path)) if "://" not in self.path else ""


def inspect_csv(
    path: str,
    delimiter: str = ",",
    header: bool = True,
    cols: list[str] | None = None,
    url_col: str | None = None,
    id_col: str | None = None,
) -> CsvSource:
    """Validate a CSV and resolve its columns; raise `InputError` with one clear line."""
    if len(delimiter) != 1:
        raise InputError(f"--delimiter must be one character, got {delimiter!r}")
    head = _read_head(path)
    if not head.strip():
        raise InputError(f"{path}: the CSV file is empty")
    lines = [line for line in head.splitlines() if line.strip()]
    if header and len(lines) < 2 and len(head.encode()) < _SNIFF_BYTES:
        raise InputError(f"{path}: no data rows (only a header?)")
    first_line = lines[0]
    parsed = next(csv.reader(io.StringIO(first_line), delimiter=delimiter))
    if len(parsed) == 1:
        hint = next((d for d in _OTHER_DELIMITERS if d != delimiter and d in first_line), None)
        if hint is not None:
            shown = "\\t" if hint == "\t" else hint
            raise InputError(
                f"{path}: only one column when split on {delimiter!r}, but the first line "
                f"contains {hint!r}; pass --delimiter '{shown}'"
            )

    if header:
        names = tuple(parsed)
        blank = [i for i, n in enumerate(names) if not n.strip()]
        if blank:
            raise InputError(f"{path}: header has an empty column name at position {blank[0] + 1}; "
                             "name it, or pass --no-header")
        if len(set(names)) != len(names):
            raise InputError(f"{path}: header has duplicate column names: {', '.join(names)}")
        if cols:
            missing = [c for c in cols if c not in names]
            if missing:
                raise InputError(f"{path}: --cols names {', '.join(missing)} not in the header "
                                 f"({', '.join(names)})")
        keep = tuple(cols) if cols else names
    else:
        if cols:
            if len(cols) != len(parsed):
                raise InputError(f"{path}: --cols gives {len(cols)} names but rows have "
                                 f"{len(parsed)} fields")
            names = tuple(cols)
        else:
            names = tuple(f"col{i + 1}" for i in range(len(parsed)))
        keep = names

    url = url_col or keep[-1]
    ident = id_col or keep[0]
    for option, column in (("--url-col", url), ("--id-col", ident)):
        if column not in names:
            raise InputError(f"{path}: {option} {column!r} is not a column "
                             f"(columns: {', '.join(names)})")
    if ROW_COLUMN in names:
        raise InputError(f"{path}: column name {ROW_COLUMN!r} is reserved; rename it")
    keep = keep + tuple(c for c in (ident, url) if c not in keep)
    return CsvSource(path, delimiter, header, names, keep, url, ident)


def _read_head(path: str) -> str:
    """The first bytes of the file as text, with one-line errors for unreadable files."""
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a CSV file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff")


def read_blocks(source: CsvSource, blocksize: int = 16 * 2**20) -> dd.DataFrame:
    """A lazy Dask dataframe of every column, each field a string, blanks kept as ''.

    All columns are parsed (no `usecols`), so a row with too many fields is an error
    rather than silently truncated; `assemble_partition` keeps the wanted columns.
    """
    with _parse_errors():
        return dd.read_csv(
            source.path,
            sep=source.delimiter,
            header=0 if source.header else None,
            names=list(source.names),
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8",
            encoding_errors="replace",
            blocksize=blocksize,
            skip_blank_lines=True,
        )


def count_rows(blocks: dd.DataFrame) -> list[int]:
    """Rows per CSV block (the cheap first pass that fixes row ids)."""
    with _parse_errors():
        return [int(n) for n in blocks.map_partitions(len).compute()]


@contextmanager
def _parse_errors():
    """Turn pandas' parser errors (raised locally or on a worker) into one-line `InputError`s."""
    try:
        yield
    except (pd.errors.ParserError, UnicodeError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot parse the CSV: {message}") from None


Piece = tuple[int, int, int]  # (block index, start row in block, stop row in block)


def plan_partitions(block_lengths: list[int], partition_rows: int) -> list[list[Piece]]:
    """Cut the concatenated blocks into partitions of `partition_rows` rows (the last may be short).

    Partition k holds global rows [k * partition_rows, (k + 1) * partition_rows).
    """
    if partition_rows < 1:
        raise InputError("--partition-rows must be at least 1")
    plan: list[list[Piece]] = []
    current: list[Piece] = []
    room = partition_rows
    for block, length in enumerate(block_lengths):
        start = 0
        while start < length:
            take = min(room, length - start)
            current.append((block, start, start + take))
            start += take
            room -= take
            if room == 0:
                plan.append(current)
                current, room = [], partition_rows
    if current:
        plan.append(current)
    return plan


def assemble_partition(first_row: int, slices: list[tuple[pd.DataFrame, int, int]],
                       columns: list[str]) -> pd.DataFrame:
    """Concatenate block slices into one partition of `columns`, rows numbered from `first_row`."""
    parts = [frame.iloc[start:stop][columns] for frame, start, stop in slices]
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    rows.insert(0, ROW_COLUMN, range(first_row, first_row + len(rows)))
    return rows
