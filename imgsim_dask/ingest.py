"""Ingest: read a CSV of image URLs with a Dask dataframe and fix every row's id before work starts.

The CSV is checked on the driver first (so a bad file fails in a second with one clear
line), then read by Dask in byte blocks, each parsed with the `csv` module into a pandas
frame of strings. A row with too many or too few fields is kept, with the reason in
`INGEST_ERROR`, and becomes a `bad_row` status later: never a crash, never a silent shift
(pandas' parser drops or shifts such fields with only a warning). A first pass scans every
block (encoding, quotes, row count); `plan_partitions` cuts the global row range into
fixed-size partitions that are aligned with the feature store's chunks, whatever the block
boundaries.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
from dask import delayed
from dask.base import tokenize
from dask.bytes import read_bytes

from .errors import InputError

ROW_COLUMN = "row"
INGEST_ERROR = "_ingest_error"  # travels from ingest to fetch, never to the outputs
RESERVED_COLUMNS = (ROW_COLUMN, "status", "error", "http_status", "bytes", "sha256", "width",
                    "height", INGEST_ERROR)
_SNIFF_BYTES = 64 * 1024
_MAX_HEAD = 16 * 2**20  # the driver reads at most this much to find the first record
_OTHER_DELIMITERS = (";", "\t", "|", ",")
_FIELD_LIMIT = 2**31 - 1  # no practical limit: csv's default (131072) stopped whole runs
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32le"), (b"\x00\x00\xfe\xff", "utf-32be"),
              (b"\xff\xfe", "utf-16le"), (b"\xfe\xff", "utf-16be"))
_LINE_BREAK = re.compile(r"\r\n?|\n")


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
    head, whole = _read_head(path, delimiter)
    if whole and not head.strip():
        raise InputError(f"{path}: the CSV file is empty")
    records = list(_records(_Lines(head), delimiter))
    if whole and records[-1][2]:
        raise InputError(_never_closed(path, _open_field_line(*records[-1][:2])))
    if header and whole and len(records) < 2:
        raise InputError(f"{path}: no data rows (only a header?)")
    parsed = records[0][1]
    if len(parsed) == 1:
        hint = next((d for d in _OTHER_DELIMITERS if d != delimiter and d in parsed[0]), None)
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
        remedy = ("rename it, or leave it out with --cols" if header
                  else "name it otherwise in --cols")
        raise InputError(f"{path}: column name {clash[0]!r} is reserved for the row table; "
                         + remedy)
    return CsvSource(path, delimiter, header, names, keep, url, ident)


def _read_head(path: str, delimiter: str) -> tuple[str, bool]:
    """The file's first 64 KiB of whole lines as text, more if its first record is longer,
    and whether that is the whole file; one-line errors for unreadable or non-UTF-8 files."""
    try:
        with fsspec.open(path, "rb") as f:
            raw, whole = b"", False
            while not whole:
                wanted = max(len(raw), _SNIFF_BYTES)
                chunk = f.read(wanted)
                raw, whole = raw + chunk, len(chunk) < wanted
                head = _decode_head(path, raw, whole)
                first = next(_records(_Lines(head), delimiter), None)
                if first is not None and not first[2]:
                    break
                if len(raw) >= _MAX_HEAD and not whole:
                    raise InputError(f"{path}: the first record does not end within "
                                     f"{_MAX_HEAD >> 20} MiB; is a quote not closed?")
            return head, whole
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a CSV file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except (OSError, ValueError, ImportError) as exc:  # fsspec: unknown protocol, missing driver
        raise InputError(f"{path}: cannot read ({exc})") from None


def _decode_head(path: str, raw: bytes, whole: bool) -> str:
    """The start of the file as text (whole lines only, unless `whole`); UTF-16/32 (by byte
    order mark or NUL bytes) and other encodings are refused."""
    wide = next((name for bom, name in _WIDE_BOMS if raw.startswith(bom)), None)
    if wide is not None:
        raise InputError(f"{path}: {wide.upper()} text (byte order mark), not UTF-8; "
                         f"convert it, e.g. iconv -f {wide} -t utf-8")
    if b"\0" in raw:
        line = raw[:raw.index(b"\0")].count(b"\n") + 1
        raise InputError(f"{path}: not UTF-8 (NUL bytes from line {line}: UTF-16 or UTF-32?); "
                         "convert it, e.g. iconv -f utf-16 -t utf-8")
    if not whole:
        raw = raw[:raw.rfind(b"\n") + 1]
    try:
        return _decode(raw, first=True)
    except UnicodeDecodeError as exc:
        raise InputError(_not_utf8(path, *_bad_byte(raw, exc))) from None


def _decode(block: bytes, first: bool) -> str:
    """Strict UTF-8; `first`: the bytes start the file (a UTF-8 byte order mark is dropped)."""
    text = block.decode("utf-8")
    return text.removeprefix("\ufeff") if first else text


def _bad_byte(block: bytes, exc: UnicodeDecodeError) -> tuple[int, int]:
    """(line in the block, byte value) where decoding failed."""
    return len(_LINE_BREAK.findall(block[:exc.start].decode())) + 1, block[exc.start]


def _not_utf8(path: str, line: int, byte: int) -> str:
    return (f"{path}: not UTF-8 (byte 0x{byte:02x} on line {line}); convert it, "
            "e.g. iconv -f latin1 -t utf-8")


def _never_closed(path: str, line: int) -> str:
    return f"{path}: a quoted field opened on line {line} is never closed"


class _Lines:
    """Lines of a text for `csv.reader`, counted; `prefix` goes before the first one
    (a quote starts the text inside a quoted field). `exhausted`: the reader asked past the end."""

    def __init__(self, text: str, prefix: str = ""):
        self._text = io.StringIO(text, newline="")
        self._prefix = prefix
        self.count = 0
        self.exhausted = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._text.readline()
        if not line:
            self.exhausted = True
            raise StopIteration
        self.count += 1
        return self._prefix + line if self.count == 1 else line


def _records(lines: _Lines, delimiter: str) -> Iterator[tuple[int, list[str], bool]]:
    """(line, fields, open) of each non-blank CSV record: the line it starts on, and whether
    the text ends inside it (a quoted field is still open)."""
    csv.field_size_limit(_FIELD_LIMIT)  # process-global: set wherever rows are parsed
    reader = csv.reader(lines, delimiter=delimiter)
    start = 1
    for fields in reader:
        if fields:
            yield start, fields, lines.exhausted
        start = reader.line_num + 1


def _open_field_line(start: int, fields: list[str]) -> int:
    """Line on which the last field of a record that starts on line `start` opened."""
    return start + sum(len(_LINE_BREAK.findall(field)) for field in fields[:-1])


@dataclass(frozen=True)
class BlockScan:
    """One byte block parsed from a given start, outside or inside a quoted field.

    `open_line`: the line of the block where a quoted field still open at its end opened
    (0: before the block), None if none is; `bad_byte`: (line, byte) of the first byte that is
    not UTF-8.
    """

    rows: int = 0  # records that start in the block
    lines: int = 0
    open_line: int | None = None
    bad_byte: tuple[int, int] | None = None


def scan_block(block: bytes, delimiter: str, first: bool = False) -> tuple[BlockScan, BlockScan]:
    """Scan one block as if it starts outside a quoted field, and as if it starts inside one."""
    try:
        text = _decode(block, first)
    except UnicodeDecodeError as exc:
        bad = BlockScan(bad_byte=_bad_byte(block, exc))
        return bad, bad
    outside = _scan(text, delimiter, in_quote=False)
    if '"' not in text:  # no quote ends the field it starts in
        return outside, BlockScan(lines=outside.lines, open_line=0)
    return outside, _scan(text, delimiter, in_quote=True)


def _scan(text: str, delimiter: str, in_quote: bool) -> BlockScan:
    """Parse a block's text; `in_quote`: its first record continues one from before."""
    lines = _Lines(text, '"' if in_quote else "")
    records, open_line = 0, 0 if in_quote else None
    for records, (start, fields, is_open) in enumerate(_records(lines, delimiter), 1):
        continued = in_quote and records == 1 and len(fields) == 1
        open_line = (0 if continued else _open_field_line(start, fields)) if is_open else None
    rows = records - 1 if in_quote and records else records  # the first one started before
    return BlockScan(rows, lines.count, open_line)


def read_blocks(source: CsvSource, blocksize: int = 16 * 2**20) -> tuple[dd.DataFrame, list[int]]:
    """A lazy Dask dataframe of every column (strings, blanks kept as '') plus `INGEST_ERROR`,
    a partition per byte block, and the rows of each block.

    Blocks end at newlines. A first pass scans every block from both possible starts, since a
    quoted field may hold newlines across a boundary; chaining the scans in file order fixes
    each block's start, counts its rows, and refuses a file that is not UTF-8 or ends inside
    a quoted field with one line naming where. The block whose last record runs on into the
    next blocks reads them to finish it.
    """
    _, [raw] = read_bytes(source.path, delimiter=b"\n", blocksize=blocksize, sample=False)
    token = tokenize(source, raw)[:8]
    scans = dask.compute(*[delayed(scan_block)(block, source.delimiter, first=i == 0,
                                               dask_key_name=f"csv-scan-{i:05d}-{token}")
                           for i, block in enumerate(raw)])
    starts, chosen = _chain(source.path, scans)
    lengths = [scan.rows for scan in chosen]
    header_block = next((i for i, n in enumerate(lengths) if n), None) if source.header else None
    if header_block is not None:
        lengths[header_block] -= 1
    parts = [delayed(parse_block)(block, raw[i + 1:_last_block_of_record(chosen, i) + 1], source,
                                  lengths[i], first=i == 0, in_quote=starts[i],
                                  skip_header=i == header_block,
                                  dask_key_name=f"csv-block-{i:05d}-{token}")
             for i, block in enumerate(raw)]
    meta = pd.DataFrame({c: pd.Series(dtype=object) for c in (*source.names, INGEST_ERROR)})
    return dd.from_delayed(parts, meta=meta, verify_meta=False), lengths


def _chain(path: str, scans: tuple[tuple[BlockScan, BlockScan], ...]
           ) -> tuple[list[bool], list[BlockScan]]:
    """Each block's start (inside a quoted field or not) and its scan from that start."""
    starts, chosen = [], []
    in_quote, line, opened = False, 0, 0
    for outside, inside in scans:
        scan = inside if in_quote else outside
        if scan.bad_byte:
            raise InputError(_not_utf8(path, line + scan.bad_byte[0], scan.bad_byte[1]))
        starts.append(in_quote)
        chosen.append(scan)
        if scan.open_line:
            opened = line + scan.open_line
        in_quote = scan.open_line is not None
        line += scan.lines
    if in_quote:
        raise InputError(_never_closed(path, opened))
    return starts, chosen


def _last_block_of_record(scans: list[BlockScan], i: int) -> int:
    """The block where the last record of block `i` ends."""
    if not scans[i].open_line:
        return i
    i += 1
    while scans[i].open_line == 0:  # one quoted field throughout
        i += 1
    return i


def parse_block(block: bytes, more: list[bytes], source: CsvSource, rows: int,
                first: bool = False, in_quote: bool = False,
                skip_header: bool = False) -> pd.DataFrame:
    """The `rows` records that start in one block of CSV bytes, `INGEST_ERROR` set for ragged ones.

    `more`: the next blocks, which a quoted field of the last record runs on into; `in_quote`:
    the block starts inside a quoted field (the end of the previous block's last record,
    skipped); `first`: the block starts the file.
    """
    text = _decode(block, first) + "".join(_decode(b, False) for b in more)
    records = _records(_Lines(text, '"' if in_quote else ""), source.delimiter)
    if in_quote:
        next(records, None)
    if skip_header:
        next(records, None)
    width = len(source.names)
    reference = "the header" if source.header else "the first row"
    fields_of_rows, errors = [], []
    for _, fields, _ in islice(records, rows):
        if len(fields) == width:
            errors.append("")
        else:
            count = f"{len(fields)} field" + ("" if len(fields) == 1 else "s")
            errors.append(f"row has {count}, {reference} {width}")
            fields = (fields + [""] * width)[:width]
        fields_of_rows.append(fields)
    frame = pd.DataFrame(fields_of_rows, columns=list(source.names), dtype=object)
    frame[INGEST_ERROR] = errors
    return frame


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
                       columns: list[str], only_rows: list[int] | None = None) -> pd.DataFrame:
    """Concatenate block slices into one partition of `columns` (plus `INGEST_ERROR`, if the
    blocks have it), rows numbered from `first_row`; with `only_rows`, just those row ids."""
    columns = [*columns, INGEST_ERROR] if INGEST_ERROR in slices[0][0] else columns
    parts = [frame.iloc[start:stop][columns] for frame, start, stop in slices]
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    rows.insert(0, ROW_COLUMN, range(first_row, first_row + len(rows)))
    if only_rows is not None:
        rows = rows[rows[ROW_COLUMN].isin(only_rows)].reset_index(drop=True)
    return rows
