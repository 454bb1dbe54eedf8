"""CSV file check: read the start of a CSV on the driver and resolve its columns, so a bad
file fails in a second with one clear line, before any cluster work."""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec

from ..errors import InputError
from ..options import CsvOptions, OptionError, opt
from ..schema import RESERVED_COLUMNS
from .text import Lines, bad_byte, csv_records, decode, never_closed, not_utf8, open_field_line

_SNIFF_BYTES = 64 * 1024
_MAX_HEAD = 16 * 2**20  # the driver reads at most this much to find the first record
_OTHER_DELIMITERS = (";", "\t", "|", ",")
_WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32le"),
    (b"\x00\x00\xfe\xff", "utf-32be"),
    (b"\xff\xfe", "utf-16le"),
    (b"\xfe\xff", "utf-16be"),
)


@dataclass(frozen=True)
class CsvFile:
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


def inspect_csv(path: str, options: CsvOptions | None = None) -> CsvFile:
    """Validate a CSV and resolve its columns; raise `InputError` with one clear line."""
    options = options or CsvOptions()
    delimiter, header, cols = options.delimiter, options.header, options.cols
    head, whole = _read_head(path, delimiter)
    if whole and not head.strip():
        raise InputError(f"{path}: the CSV file is empty")
    records = list(csv_records(Lines(head), delimiter))
    if whole and records[-1][2]:
        raise InputError(never_closed(path, open_field_line(*records[-1][:2])))
    if header and whole and len(records) < 2:
        raise InputError(f"{path}: no data rows (only a header?)")
    parsed = records[0][1]
    if len(parsed) == 1:
        hint = next((d for d in _OTHER_DELIMITERS if d != delimiter and d in parsed[0]), None)
        if hint is not None:
            shown = "\\t" if hint == "\t" else hint
            raise OptionError(
                f"{path}: only one column when split on {delimiter!r}, but the first line "
                f"contains {hint!r}; pass {opt('delimiter')} '{shown}'"
            )

    if header:
        names = tuple(parsed)
        blank = [i for i, n in enumerate(names) if not n.strip()]
        if blank:
            raise OptionError(
                f"{path}: header has an empty column name at position "
                f"{blank[0] + 1}; name it, or pass {opt('header')}"
            )
        if len(set(names)) != len(names):
            raise InputError(f"{path}: header has duplicate column names: {', '.join(names)}")
        if cols:
            missing = [c for c in cols if c not in names]
            if missing:
                raise OptionError(
                    f"{path}: {opt('cols')} names {', '.join(missing)} not in "
                    f"the header ({', '.join(names)})"
                )
        keep = tuple(cols) if cols else names
    else:
        if cols:
            if len(cols) != len(parsed):
                raise OptionError(
                    f"{path}: {opt('cols')} gives {len(cols)} names but rows "
                    f"have {len(parsed)} fields"
                )
            names = tuple(cols)
        else:
            names = tuple(f"col{i + 1}" for i in range(len(parsed)))
        keep = names

    url = options.url_col or keep[-1]
    ident = options.id_col or keep[0]
    for option, column in (("url_col", url), ("id_col", ident)):
        if column not in names:
            raise OptionError(
                f"{path}: {opt(option)} {column!r} is not a column (columns: {', '.join(names)})"
            )
    if cols and len(set(cols)) != len(cols):
        raise OptionError(f"{path}: {opt('cols')} names a column twice: {', '.join(cols)}")
    keep = tuple(dict.fromkeys(keep + (ident, url)))
    clash = [c for c in keep if c in RESERVED_COLUMNS]
    if clash:
        remedy = (
            f"rename it, or leave it out with {opt('cols')}"
            if header
            else f"name it otherwise in {opt('cols')}"
        )
        raise OptionError(
            f"{path}: column name {clash[0]!r} is reserved for the row table; " + remedy
        )
    return CsvFile(path, delimiter, header, names, keep, url, ident)


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
                first = next(csv_records(Lines(head), delimiter), None)
                if first is not None and not first[2]:
                    break
                if len(raw) >= _MAX_HEAD and not whole:
                    raise InputError(
                        f"{path}: the first record does not end within "
                        f"{_MAX_HEAD >> 20} MiB; is a quote not closed?"
                    )
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
        raise InputError(
            f"{path}: {wide.upper()} text (byte order mark), not UTF-8; "
            f"convert it, e.g. iconv -f {wide} -t utf-8"
        )
    if b"\0" in raw:
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise InputError(
            f"{path}: not UTF-8 (NUL bytes from line {line}: UTF-16 or UTF-32?); "
            "convert it, e.g. iconv -f utf-16 -t utf-8"
        )
    if not whole:
        raw = raw[: raw.rfind(b"\n") + 1]
    try:
        return decode(raw, first=True)
    except UnicodeDecodeError as exc:
        raise InputError(not_utf8(path, *bad_byte(raw, exc))) from None
