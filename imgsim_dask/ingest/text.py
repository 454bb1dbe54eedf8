"""CSV text: strict UTF-8 decoding and counted records, shared by the file check and the blocks."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

FIELD_LIMIT = 2**31 - 1  # no practical limit: csv's default (131072) stopped whole runs
LINE_BREAK = re.compile(r"\r\n?|\n")


def decode(block: bytes, first: bool) -> str:
    """Strict UTF-8; `first`: the bytes start the file (a UTF-8 byte order mark is dropped)."""
    text = block.decode("utf-8")
    return text.removeprefix("\ufeff") if first else text


def bad_byte(block: bytes, exc: UnicodeDecodeError) -> tuple[int, int]:
    """(line in the block, byte value) where decoding failed."""
    return len(LINE_BREAK.findall(block[: exc.start].decode())) + 1, block[exc.start]


def not_utf8(path: str, line: int, byte: int) -> str:
    return (
        f"{path}: not UTF-8 (byte 0x{byte:02x} on line {line}); convert it, "
        "e.g. iconv -f latin1 -t utf-8"
    )


def never_closed(path: str, line: int) -> str:
    return f"{path}: a quoted field opened on line {line} is never closed"


class Lines:
    """Lines of a text for `csv.reader`, counted; `prefix` goes before the first one
    (a quote starts the text inside a quoted field). `exhausted`: the reader asked past the end."""

    def __init__(self, text: str, prefix: str = ""):
        self._text = io.StringIO(text, newline="")
        self._prefix = prefix
        self.count = 0
        self.exhausted = False

    def __iter__(self) -> Lines:
        return self

    def __next__(self) -> str:
        line = self._text.readline()
        if not line:
            self.exhausted = True
            raise StopIteration
        self.count += 1
        return self._prefix + line if self.count == 1 else line


def csv_records(lines: Lines, delimiter: str) -> Iterator[tuple[int, list[str], bool]]:
    """(line, fields, open) of each non-blank CSV record: the line it starts on, and whether
    the text ends inside it (a quoted field is still open)."""
    csv.field_size_limit(FIELD_LIMIT)  # process-global: set wherever rows are parsed
    reader = csv.reader(lines, delimiter=delimiter)
    start = 1
    for fields in reader:
        if fields:
            yield start, fields, lines.exhausted
        start = reader.line_num + 1


def open_field_line(start: int, fields: list[str]) -> int:
    """Line on which the last field of a record that starts on line `start` opened."""
    return start + sum(len(LINE_BREAK.findall(field)) for field in fields[:-1])
