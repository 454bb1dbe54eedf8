"""CSV ingest: validation errors, column resolution, partition planning."""

from __future__ import annotations

import gzip
import io
import zipfile

import dask
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from imgsim_dask.errors import InputError
from imgsim_dask.ingest import assemble_partition, cut_partitions, inspect_csv, read_blocks
from imgsim_dask.options import CsvOptions
from imgsim_dask.schema import INGEST_ERROR


def write(tmp_path, text: str | bytes, name="in.csv"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def read_rows(source, blocksize=16 * 2**20) -> pd.DataFrame:
    """Every row as the blocks parse it, checked against the rows counted per block."""
    blocks, lengths = read_blocks(source, blocksize)
    frame = pd.concat(dask.compute(*blocks), ignore_index=True)
    assert len(frame) == sum(lengths)
    return frame


def test_defaults_follow_the_original(tmp_path):
    source = inspect_csv(write(tmp_path, "id,title,url\n1,a,http://x/1.jpg\n"))
    assert source.url_col == "url"  # the last column, as load_data_csv
    assert source.id_col == "id"
    assert source.keep == ("id", "title", "url")


def test_cols_select_and_id_url_are_always_kept(tmp_path):
    path = write(tmp_path, "id,title,link,extra\n1,a,http://x/1.jpg,z\n")
    source = inspect_csv(path, CsvOptions(cols=["title"], url_col="link", id_col="id"))
    assert source.keep == ("title", "id", "link")


def test_no_header_names_columns(tmp_path):
    path = write(tmp_path, "1,http://x/1.jpg\n2,http://x/2.jpg\n")
    assert inspect_csv(path, CsvOptions(header=False)).keep == ("col1", "col2")
    named = inspect_csv(path, CsvOptions(header=False, cols=["id", "url"]))
    assert (named.id_col, named.url_col) == ("id", "url")
    frame = read_rows(named)
    assert frame["url"].tolist() == ["http://x/1.jpg", "http://x/2.jpg"]


def test_no_header_counts_fields_in_the_first_record_not_line(tmp_path):
    """A quoted newline in the first record once made every row `bad_row`."""
    path = write(tmp_path, '1,"two\nlines",a.jpg\n2,b,c.jpg\n3,ragged\n')
    assert inspect_csv(path, CsvOptions(header=False)).names == ("col1", "col2", "col3")
    frame = read_rows(inspect_csv(path, CsvOptions(header=False, cols=["id", "title", "url"])))
    assert frame["title"].tolist() == ["two\nlines", "b", "ragged"]
    assert frame[INGEST_ERROR].tolist() == ["", "", "row has 2 fields, the first row 3"]


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("", {}, "empty"),
        ("id;url\n1;http://x/1.jpg\n", {}, "pass delimiter ';'"),
        ("id\turl\n1\thttp://x/1.jpg\n", {}, "pass delimiter '\\t'"),
        ("id,url\n1,http://x\n", {"url_col": "link"}, "url_col 'link' is not a column"),
        ("id,url\n1,http://x\n", {"cols": ["id", "nope"]}, "nope not in the header"),
        ("id,id\n1,2\n", {}, "duplicate column names"),
        ("1,http://x\n", {"header": False, "cols": ["a", "b", "c"]}, "gives 3 names"),
        ("id,url\n", {"delimiter": ";;"}, "one character"),
    ],
)
def test_unusable_csv_gives_one_line_error(tmp_path, text, kwargs, message):
    with pytest.raises(InputError) as info:
        inspect_csv(write(tmp_path, text), CsvOptions(**kwargs))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        inspect_csv(str(tmp_path / "absent.csv"))


@pytest.mark.parametrize(
    "text", ["id,url\n1,a,extra\n2,b\n3\n4,c,d,e\n", "id,url\n1,a\n2,b,extra\n3\n4,c,d,e\n"]
)
def test_ragged_rows_are_kept_and_flagged(tmp_path, text):
    """Extra fields in the first row once made pandas shift every column silently."""
    frame = read_rows(inspect_csv(write(tmp_path, text)))
    assert frame["id"].tolist() == ["1", "2", "3", "4"]
    assert frame["url"].tolist() == ["a", "b", "", "c"]
    ragged = {0: 3, 2: 1, 3: 4} if "a,extra" in text else {1: 3, 2: 1, 3: 4}
    assert frame[INGEST_ERROR].tolist() == [
        f"row has {ragged[i]} field{'' if ragged[i] == 1 else 's'}, the header 2"
        if i in ragged
        else ""
        for i in range(4)
    ]


def test_reserved_column_names_are_refused(tmp_path):
    with pytest.raises(InputError, match="'status' is reserved"):
        inspect_csv(write(tmp_path, "id,status,url\n1,new,a.jpg\n"))
    assert inspect_csv(
        write(tmp_path, "id,status,url\n1,new,a.jpg\n"), CsvOptions(cols=["id", "url"])
    ).keep == ("id", "url")
    with pytest.raises(
        InputError, match="'status' is reserved for the row table; name it otherwise in cols"
    ):
        inspect_csv(
            write(tmp_path, "1,new,a.jpg\n"), CsvOptions(header=False, cols=["id", "status", "url"])
        )


def test_blanks_and_utf8_survive_as_strings(tmp_path):
    frame = read_rows(inspect_csv(write(tmp_path, "\ufeffid,url\n1,\n2,café.jpg\n,x.jpg\n")))
    assert frame["url"].tolist() == ["", "café.jpg", "x.jpg"]
    assert frame["id"].tolist() == ["1", "2", ""]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            b"id,title,url\n1,caf\xe9,img/caf\xe9.jpg\n",
            "not UTF-8 (byte 0xe9 on line 2); convert it, e.g. iconv -f latin1 -t utf-8",
        ),
        (
            "id,url\n1,a.jpg\n".encode("utf-16"),
            "UTF-16LE text (byte order mark), not UTF-8; convert it, e.g. iconv -f utf-16le -t utf-8",
        ),
        ("id,url\n1,a.jpg\n".encode("utf-32"), "UTF-32LE text (byte order mark), not UTF-8"),
        (
            "id,url\n1,a.jpg\n".encode("utf-16-be"),
            "not UTF-8 (NUL bytes from line 1: UTF-16 or UTF-32?); convert it, e.g. iconv -f utf-16",
        ),
    ],
    ids=["latin-1", "utf-16", "utf-32", "utf-16-without-bom"],
)
def test_text_that_is_not_utf8_is_refused(tmp_path, data, message):
    """Latin-1 was read with replacement characters (paths then `not_found`), UTF-16 crashed."""
    path = write(tmp_path, data)
    with pytest.raises(InputError) as info:
        inspect_csv(path)
    assert str(info.value).startswith(f"{path}: {message}")


def _image_file(fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _workbook() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as book:
        book.writestr("xl/workbook.xml", "<workbook/>")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data, message",
    [
        (
            "photo.jpg",
            lambda: _image_file("JPEG"),
            "this is a JPEG image, not a CSV file; give the CSV that lists the images",
        ),
        ("shot.png", lambda: _image_file("PNG"), "this is a PNG image, not a CSV file"),
        ("anim.webp", lambda: _image_file("WEBP"), "this is a WebP image, not a CSV file"),
        ("scan.bmp", lambda: _image_file("BMP"), "this is a BMP image, not a CSV file"),
        (
            "urls.xlsx",
            _workbook,
            "this is a ZIP archive (an .xlsx or .ods workbook?), not a CSV file; "
            "export the sheet as CSV (UTF-8)",
        ),
        (
            "urls.csv.gz",
            lambda: gzip.compress(b"id,url\n1,a.jpg\n"),
            "this is a gzip file, not a CSV file; decompress it first, e.g. gunzip",
        ),
        (
            "blob.bin",
            lambda: np.random.default_rng(1).bytes(5000),
            "this is a binary file (it holds NUL bytes), not a CSV file; "
            "give the CSV that lists the images",
        ),
    ],
    ids=["jpeg", "png", "webp", "bmp", "xlsx", "gzip", "unknown-binary"],
)
def test_an_image_or_other_binary_file_given_as_the_csv_is_named(tmp_path, name, data, message):
    """A photo given as the CSV was reported as 'not UTF-8 (NUL bytes ...: UTF-16 or UTF-32?)'."""
    path = write(tmp_path, data(), name)
    with pytest.raises(InputError) as info:
        inspect_csv(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value) and "UTF-16" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["BMW,http://127.0.0.1/bmw.jpg\n1,a.jpg\n", "BZh,url\n1,a.jpg\n", "GIF89a,url\n1,a.jpg\n"],
)
def test_text_that_starts_like_an_image_signature_is_still_a_csv(tmp_path, text):
    """'BM' (BMP), 'BZh' (bzip2), 'GIF89a' are text too: only a file that is not text is refused."""
    assert inspect_csv(write(tmp_path, text)).names == tuple(text.split("\n")[0].split(","))


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_wide_text_without_a_byte_order_mark_is_not_called_binary(tmp_path, encoding):
    path = write(tmp_path, "id,title,url\n1,写真 ünïcode,a.jpg\n".encode(encoding))
    with pytest.raises(InputError, match=r"NUL bytes from line 1: UTF-16 or UTF-32\?"):
        inspect_csv(path)


def test_a_bad_byte_after_the_head_is_refused_with_its_line(tmp_path):
    lines = "".join(f"{i},http://h/{i}.jpg\n" for i in range(10_000))  # over 64 KiB
    source = inspect_csv(write(tmp_path, b"id,url\n" + lines.encode() + b"x,caf\xe9.jpg\n"))
    with pytest.raises(InputError, match=r"not UTF-8 \(byte 0xe9 on line 10002\)"):
        read_blocks(source, blocksize=20_000)


def test_fields_over_csvs_default_limit_are_kept(tmp_path):
    """csv's 131072-character field limit once stopped the whole run."""
    long, lines = "x" * 200_000, "a\n" * 100_000
    path = write(tmp_path, f'id,title,url\n1,{long},a.jpg\n2,"{lines}",b.jpg\n3,c,c.jpg\n')
    frame = read_rows(inspect_csv(path), blocksize=5_000)  # the quoted field spans 40 blocks
    assert frame["title"].tolist() == [long, lines, "c"]
    assert frame["url"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    headless = write(tmp_path, f'"{lines}",a.jpg\n2,b.jpg\n', "headless.csv")  # over 64 KiB
    assert inspect_csv(headless, CsvOptions(header=False)).names == ("col1", "col2")


@pytest.mark.parametrize(
    "text, line",
    [
        ('id,title,url\n1,ok,a.jpg\n2,"12 inch,b.jpg\n3,p,c.jpg\n4,p,d.jpg\n', 3),
        ('id,title,url\n1,"x\ny","open,a.jpg\n2,b,c.jpg\n', 3),
        ('id,url\n"1\n', 2),
    ],
    ids=["swallows-the-rest", "after-a-multiline-field", "last-line"],
)
def test_a_quote_never_closed_is_refused_with_its_line(tmp_path, text, line):
    """Rows after an unclosed quote once vanished into its field, silently."""
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        inspect_csv(path)
    assert str(info.value) == f"{path}: a quoted field opened on line {line} is never closed"


def test_a_quote_never_closed_after_the_head_is_refused(tmp_path):
    rows = "".join(f"{i},http://h/{i}.jpg\n" for i in range(10_000))
    source = inspect_csv(write(tmp_path, f'id,url\n{rows}10000,"http://h/x.jpg\n{rows}'))
    with pytest.raises(InputError, match="opened on line 10002 is never closed"):
        read_blocks(source, blocksize=20_000)


def test_quoted_newlines_across_block_boundaries(tmp_path):
    """Blocks end at newlines, also inside quoted fields: a field is finished from the next
    blocks and not taken for rows of its own."""
    titles = [f"line one\r\nline two {i}" if i != 150 else "x\n" * 3000 for i in range(300)]
    text = "id,title,url\n" + "".join(f'{i},"{t}",{i}.jpg\n' for i, t in enumerate(titles))
    frame = read_rows(inspect_csv(write(tmp_path, text)), blocksize=1_000)
    assert frame["title"].tolist() == titles
    assert frame["url"].tolist() == [f"{i}.jpg" for i in range(300)]
    assert set(frame[INGEST_ERROR]) == {""}


@given(st.lists(st.integers(0, 40), max_size=12), st.integers(1, 17))
def test_plan_covers_every_row_once_in_order(lengths, partition_rows):
    plan = cut_partitions(lengths, partition_rows)
    covered = [
        (block, r) for pieces in plan for block, start, stop in pieces for r in range(start, stop)
    ]
    assert covered == [(b, r) for b, n in enumerate(lengths) for r in range(n)]
    sizes = [sum(stop - start for _, start, stop in pieces) for pieces in plan]
    assert all(size == partition_rows for size in sizes[:-1])
    assert not sizes or 0 < sizes[-1] <= partition_rows


def test_assemble_numbers_rows_across_blocks():
    a = pd.DataFrame({"url": ["a", "b", "c"]})
    b = pd.DataFrame({"url": ["d", "e"]})
    part = assemble_partition(10, [(a, 1, 3), (b, 0, 1)], ["url"])
    assert part["row"].tolist() == [10, 11, 12]
    assert part["url"].tolist() == ["b", "c", "d"]


def test_blocks_and_rows_agree_for_many_small_blocks(tmp_path):
    lines = "".join(f"{i},http://h/{i}.jpg\n" for i in range(1000))
    source = inspect_csv(write(tmp_path, "id,url\n" + lines))
    blocks, lengths = read_blocks(source, blocksize=2000)
    assert len(lengths) > 3 and sum(lengths) == 1000
    frames = list(dask.compute(*blocks))
    parts = [
        assemble_partition(k * 64, [(frames[b], s, e) for b, s, e in pieces], ["id", "url"])
        for k, pieces in enumerate(cut_partitions(lengths, 64))
    ]
    merged = pd.concat(parts, ignore_index=True)
    assert merged["row"].tolist() == list(range(1000))
    assert merged["id"].tolist() == [str(i) for i in range(1000)]


def test_columns_are_kept_once(tmp_path):
    path = write(tmp_path, "id,title,url\n1,a,b.jpg\n")
    assert inspect_csv(path, CsvOptions(cols=["title"], url_col="url", id_col="url")).keep == (
        "title",
        "url",
    )
    with pytest.raises(InputError, match="cols names a column twice"):
        inspect_csv(path, CsvOptions(cols=["url", "url"]))


def test_unknown_protocol_is_one_line_error():
    with pytest.raises(InputError, match="cannot read"):
        inspect_csv("nosuchproto://bucket/in.csv")


@pytest.mark.parametrize(
    "text, header",
    [
        ("id,url\n1,a.jpg\n2,b.jpg\n", True),
        ("id,url\n1,a.jpg\n\n\n2,b.jpg", True),  # blank lines are no rows; no final newline
        ('id,title,url\n1,"two\nlines",a.jpg\n2,"",b.jpg\n3,x,c.jpg\n', True),
        ("1,a.jpg\n2,b.jpg\n", False),
    ],
)
def test_a_small_file_is_counted_at_inspection_as_the_scan_counts_it(tmp_path, text, header):
    """The count decides whether a job is small enough to run on workers in this process."""
    source = inspect_csv(write(tmp_path, text), CsvOptions(header=header))
    assert source.rows == len(read_rows(source))


def test_a_file_too_big_to_read_at_inspection_is_not_counted(tmp_path):
    rows = "".join(f"{i},http://h/{i}.jpg\n" for i in range(10_000))  # ~220 KB
    assert inspect_csv(write(tmp_path, f"id,url\n{rows}")).rows is None
