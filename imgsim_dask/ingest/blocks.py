"""CSV blocks: cut a CSV into byte blocks with Dask's reader, count each block's rows in a
first pass, and parse blocks into frames of strings on the workers.

A row with too many or too few fields is kept, with the reason in `INGEST_ERROR`, and
becomes a `bad_row` status later: never a crash, never a silent shift (pandas' parser drops
or shifts such fields with only a warning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import dask
import pandas as pd
from dask import delayed
from dask.base import tokenize
from dask.bytes import read_bytes
from dask.delayed import Delayed

from ..errors import InputError
from ..schema import INGEST_ERROR
from .csvfile import CsvFile
from .text import Lines, bad_byte, csv_records, decode, never_closed, not_utf8, open_field_line


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
        text = decode(block, first)
    except UnicodeDecodeError as exc:
        bad = BlockScan(bad_byte=bad_byte(block, exc))
        return bad, bad
    outside = _scan(text, delimiter, in_quote=False)
    if '"' not in text:  # no quote ends the field it starts in
        return outside, BlockScan(lines=outside.lines, open_line=0)
    return outside, _scan(text, delimiter, in_quote=True)


def _scan(text: str, delimiter: str, in_quote: bool) -> BlockScan:
    """Parse a block's text; `in_quote`: its first record continues one from before."""
    lines = Lines(text, '"' if in_quote else "")
    records, open_line = 0, 0 if in_quote else None
    for records, (start, fields, is_open) in enumerate(csv_records(lines, delimiter), 1):
        continued = in_quote and records == 1 and len(fields) == 1
        open_line = (0 if continued else open_field_line(start, fields)) if is_open else None
    rows = records - 1 if in_quote and records else records  # the first one started before
    return BlockScan(rows, lines.count, open_line)


def read_blocks(
    csv_file: CsvFile,
    blocksize: int = 16 * 2**20,
    compute: Callable[[list[Delayed]], Sequence[Any]] | None = None,
) -> tuple[list[Delayed], list[int]]:
    """The lazy parse of each byte block (a frame of every column as strings, blanks kept as
    '', plus `INGEST_ERROR`) and the rows of each block.

    Blocks end at newlines. A first pass scans every block from both possible starts, since a
    quoted field may hold newlines across a boundary; chaining the scans in file order fixes
    each block's start, counts its rows, and refuses a file that is not UTF-8 or ends inside
    a quoted field with one line naming where. The block whose last record runs on into the
    next blocks reads them to finish it. `compute` runs the scans (default: `dask.compute`).
    """
    _, [raw] = read_bytes(csv_file.path, delimiter=b"\n", blocksize=blocksize, sample=False)
    token = tokenize(csv_file, raw)[:8]
    scan_tasks = [
        delayed(scan_block)(
            block, csv_file.delimiter, first=i == 0, dask_key_name=f"csv-scan-{i:05d}-{token}"
        )
        for i, block in enumerate(raw)
    ]
    scans = compute(scan_tasks) if compute else dask.compute(*scan_tasks)
    starts, chosen = _chain(csv_file.path, scans)
    lengths = [scan.rows for scan in chosen]
    header_block = next((i for i, n in enumerate(lengths) if n), None) if csv_file.header else None
    if header_block is not None:
        lengths[header_block] -= 1
    parts = [
        delayed(parse_block)(
            block,
            raw[i + 1 : _last_block_of_record(chosen, i) + 1],
            csv_file,
            lengths[i],
            first=i == 0,
            in_quote=starts[i],
            skip_header=i == header_block,
            dask_key_name=f"csv-block-{i:05d}-{token}",
        )
        for i, block in enumerate(raw)
    ]
    return parts, lengths


def _chain(
    path: str, scans: Sequence[tuple[BlockScan, BlockScan]]
) -> tuple[list[bool], list[BlockScan]]:
    """Each block's start (inside a quoted field or not) and its scan from that start."""
    starts, chosen = [], []
    in_quote, line, opened = False, 0, 0
    for outside, inside in scans:
        scan = inside if in_quote else outside
        if scan.bad_byte:
            raise InputError(not_utf8(path, line + scan.bad_byte[0], scan.bad_byte[1]))
        starts.append(in_quote)
        chosen.append(scan)
        if scan.open_line:
            opened = line + scan.open_line
        in_quote = scan.open_line is not None
        line += scan.lines
    if in_quote:
        raise InputError(never_closed(path, opened))
    return starts, chosen


def _last_block_of_record(scans: list[BlockScan], i: int) -> int:
    """The block where the last record of block `i` ends."""
    if not scans[i].open_line:
        return i
    i += 1
    while scans[i].open_line == 0:  # one quoted field throughout
        i += 1
    return i


def parse_block(
    block: bytes,
    more: list[bytes],
    csv_file: CsvFile,
    rows: int,
    first: bool = False,
    in_quote: bool = False,
    skip_header: bool = False,
) -> pd.DataFrame:
    """The `rows` records that start in one block of CSV bytes, `INGEST_ERROR` set for ragged ones.

    `more`: the next blocks, which a quoted field of the last record runs on into; `in_quote`:
    the block starts inside a quoted field (the end of the previous block's last record,
    skipped); `first`: the block starts the file.
    """
    text = decode(block, first) + "".join(decode(b, False) for b in more)
    records = csv_records(Lines(text, '"' if in_quote else ""), csv_file.delimiter)
    if in_quote:
        next(records, None)
    if skip_header:
        next(records, None)
    width = len(csv_file.names)
    reference = "the header" if csv_file.header else "the first row"
    fields_of_rows, errors = [], []
    for _, fields, _ in islice(records, rows):
        if len(fields) == width:
            errors.append("")
        else:
            count = f"{len(fields)} field" + ("" if len(fields) == 1 else "s")
            errors.append(f"row has {count}, {reference} {width}")
            fields = (fields + [""] * width)[:width]
        fields_of_rows.append(fields)
    frame = pd.DataFrame(fields_of_rows, columns=list(csv_file.names), dtype=object)
    frame[INGEST_ERROR] = errors
    return frame
