"""CSV file check: read the start of a CSV on the driver and resolve its columns, so a bad
file fails in a second with one clear line, before any cluster work."""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass

import fsspec

from ..decode import format_name, sniff_format
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
_WIDE_CODECS = ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
_WIDE_SAMPLE = 4096  # bytes tried as UTF-16/32 to tell wide text from other binary files
# Files given instead of the CSV by mistake, by their first bytes (images: `sniff_format`):
# (magic, what the file is, what to do instead)
_GIVE_THE_CSV = "give the CSV that lists the images"
_EXPORT = "export the sheet as CSV (UTF-8)"
_DECOMPRESS = "decompress it first"
_BINARY_KINDS = (
    (b"PK\x03\x04", "a ZIP archive (an .xlsx or .ods workbook?)", _EXPORT + ", or unzip it"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a Microsoft Office file (an .xls workbook?)", _EXPORT),
    (b"\x1f\x8b", "a gzip file", _DECOMPRESS + ", e.g. gunzip"),
    (b"BZh", "a bzip2 file", _DECOMPRESS + ", e.g. bunzip2"),
    (b"\xfd7zXZ\x00", "an xz file", _DECOMPRESS + ", e.g. unxz"),
    (b"\x28\xb5\x2f\xfd", "a Zstandard file", _DECOMPRESS + ", e.g. unzstd"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", _DECOMPRESS),
    (b"%PDF-", "a PDF document", _GIVE_THE_CSV),
    (b"PAR1", "a Parquet file", "convert it to CSV, e.g. pandas.read_parquet(...).to_csv(...)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (model weights or exported features?)", _GIVE_THE_CSV),
    (b"\x93NUMPY", "a NumPy array file", _GIVE_THE_CSV),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV"),
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
    rows: int | None = None  # data records, when the file was small enough to read whole

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
    rows = len(records) - header if whole else None
    return CsvFile(path, delimiter, header, names, keep, url, ident, rows)


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
    """The start of the file as text (whole lines only, unless `whole`); an image or other
    binary file (by its first bytes), UTF-16/32 (by byte order mark or NUL bytes) and other
    encodings are refused."""
    wide = next((name for bom, name in _WIDE_BOMS if raw.startswith(bom)), None)
    if wide is not None:
        raise InputError(
            f"{path}: {wide.upper()} text (byte order mark), not UTF-8; "
            f"convert it, e.g. iconv -f {wide} -t utf-8"
        )
    binary = _binary_kind(raw)
    if binary is not None:
        what, remedy = binary
        raise InputError(f"{path}: this is {what}, not a CSV file; {remedy}")
    if b"\0" in raw:
        if not _is_wide_text(raw):
            raise InputError(
                f"{path}: this is a binary file (it holds NUL bytes), not a CSV file; "
                + _GIVE_THE_CSV
            )
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


def _binary_kind(raw: bytes) -> tuple[str, str] | None:
    """(what the file is, what to do instead) when its first bytes name an image or another
    binary format and it is not text; None for anything else."""
    image = sniff_format(raw)
    if image is not None:
        image = format_name(image)
        article = "an" if image[0] in "AEIOU" else "a"
        kind: tuple[str, str] | None = (f"{article} {image} image", _GIVE_THE_CSV)
    else:
        kind = next(((w, r) for magic, w, r in _BINARY_KINDS if raw.startswith(magic)), None)
    if kind is None or (b"\0" not in raw and _is_utf8(raw)):
        return None  # a short signature ('BM', 'BZh') may start a line of text
    return kind


def _is_utf8(raw: bytes) -> bool:
    """Whether `raw` is UTF-8 (a character cut at its end aside)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _is_wide_text(raw: bytes) -> bool:
    """Whether the start of `raw` reads as UTF-16 or UTF-32 text: it decodes (a random binary
    file breaks on an unpaired surrogate) and is nearly all printable characters."""
    sample = raw[:_WIDE_SAMPLE]
    for codec in _WIDE_CODECS:
        try:
            text = codecs.getincrementaldecoder(codec)().decode(sample, final=False)
        except UnicodeDecodeError:
            continue
        printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
        if text and printable >= 0.95 * len(text):
            return True
    return False
