"""Ingest: read a CSV of image URLs with a Dask dataframe and fix every row's id before work starts.

The CSV is checked on the driver first (so a bad file fails in a second with one clear
line), then read by Dask in byte blocks, each parsed with the `csv` module into a pandas
frame of strings. A row with too many or too few fields is kept, with the reason in
`INGEST_ERROR`, and becomes a `bad_row` status later: never a crash, never a silent shift
(pandas' parser drops or shifts such fields with only a warning). Block lengths are
counted in a first cheap pass; `plan_partitions` cuts the global row range into fixed-size
partitions that are aligned with the feature store's chunks, whatever the block boundaries.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

import dask.dataframe as dd
import fsspec
import pandas as pd
from dask import delayed
from dask.bytes import read_bytes

from .errors import InputError

ROW_COLUMN = "row"
INGEST_ERROR = "_ingest_error"  # travels from ingest to fetch, never to the outputs
RESERVED_COLUMNS = (ROW_COLUMN, "status", "error", "http_status", "bytes", "sha256", "width",
                    "height", INGEST_ERROR)
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
    if cols and len(set(cols)) != len(cols):
        raise InputError(f"{path}: --cols names a column twice: {', '.join(cols)}")
    keep = tuple(dict.fromkeys(keep + (ident, url)))
    clash = [c for c in keep if c in RESERVED_COLUMNS]
    if clash:
        raise InputError(f"{path}: column name {clash[0]!r} is reserved for the row table; "
                         "rename it, or leave it out with --cols")
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
    except (OSError, ValueError, ImportError) as exc:  # fsspec: unknown protocol, missing driver
        raise InputError(f"{path}: cannot read ({exc})") from None
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff")


def read_blocks(source: CsvSource, blocksize: int = 16 * 2**20) -> dd.DataFrame:
    """A lazy Dask dataframe of every column (strings, blanks kept as '') plus `INGEST_ERROR`.

    Blocks end at newlines, so a quoted field holding a newline must not straddle a block
    boundary (as with `dask.dataframe.read_csv`).
    """
    _, [blocks] = read_bytes(source.path, delimiter=b"\n", blocksize=blocksize, sample=False)
    parts = [delayed(parse_block)(block, source.delimiter, source.names, first=i == 0,
                                  skip_header=source.header and i == 0,
                                  dask_key_name=f"csv-block-{i:05d}-{_token(source)}")
             for i, block in enumerate(blocks)]
    meta = pd.DataFrame({c: pd.Series(dtype=object) for c in (*source.names, INGEST_ERROR)})
    return dd.from_delayed(parts, meta=meta, verify_meta=False)


def _token(source: CsvSource) -> str:
    from dask.base import tokenize

    return tokenize(source)[:8]


def parse_block(block: bytes, delimiter: str, names: tuple[str, ...], first: bool = False,
                skip_header: bool = False) -> pd.DataFrame:
    """Parse one block of CSV bytes: a row per record, `INGEST_ERROR` set for ragged ones.

    `first`: the block starts the file (a UTF-8 byte order mark there is dropped).
    """
    text = block.decode("utf-8", errors="replace")
    if first:
        text = text.removeprefix("\ufeff")
    width = len(names)
    records, errors = [], []
    try:
        for fields in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            if not fields:  # a blank line is not a row
                continue
            if skip_header:
                skip_header = False
                continue
            if len(fields) == width:
                errors.append("")
            else:
                errors.append(f"row has {len(fields)} fields, the header {width}")
                fields = (fields + [""] * width)[:width]
            records.append(fields)
    except csv.Error as exc:
        raise InputError(f"cannot parse the CSV: {exc}") from None
    frame = pd.DataFrame(records, columns=list(names), dtype=object)
    frame[INGEST_ERROR] = errors
    return frame


def count_rows(blocks: dd.DataFrame) -> list[int]:
    """Rows per CSV block (the cheap first pass that fixes row ids)."""
    return [int(n) for n in blocks.map_partitions(len).compute()]


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
    """Concatenate block slices into one partition of `columns` (plus `INGEST_ERROR`, if the
    blocks have it), rows numbered from `first_row`."""
    columns = [*columns, INGEST_ERROR] if INGEST_ERROR in slices[0][0] else columns
    parts = [frame.iloc[start:stop][columns] for frame, start, stop in slices]
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    rows.insert(0, ROW_COLUMN, range(first_row, first_row + len(rows)))
    return rows
