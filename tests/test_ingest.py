"""CSV ingest: validation errors, column resolution, partition planning."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgsim_dask.errors import InputError
from imgsim_dask.ingest import (
    INGEST_ERROR,
    assemble_partition,
    count_rows,
    inspect_csv,
    plan_partitions,
    read_blocks,
)


def write(tmp_path, text: str, name="in.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_follow_the_original(tmp_path):
    source = inspect_csv(write(tmp_path, "id,title,url\n1,a,http://x/1.jpg\n"))
    assert source.url_col == "url"  # the last column, as load_data_csv
    assert source.id_col == "id"
    assert source.keep == ("id", "title", "url")


def test_cols_select_and_id_url_are_always_kept(tmp_path):
    path = write(tmp_path, "id,title,link,extra\n1,a,http://x/1.jpg,z\n")
    source = inspect_csv(path, cols=["title"], url_col="link", id_col="id")
    assert source.keep == ("title", "id", "link")


def test_no_header_names_columns(tmp_path):
    path = write(tmp_path, "1,http://x/1.jpg\n2,http://x/2.jpg\n")
    assert inspect_csv(path, header=False).keep == ("col1", "col2")
    named = inspect_csv(path, header=False, cols=["id", "url"])
    assert (named.id_col, named.url_col) == ("id", "url")
    frame = read_blocks(named).compute()
    assert frame["url"].tolist() == ["http://x/1.jpg", "http://x/2.jpg"]


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("", {}, "empty"),
        ("id;url\n1;http://x/1.jpg\n", {}, "--delimiter ';'"),
        ("id\turl\n1\thttp://x/1.jpg\n", {}, "--delimiter '\\t'"),
        ("id,url\n1,http://x\n", {"url_col": "link"}, "--url-col 'link' is not a column"),
        ("id,url\n1,http://x\n", {"cols": ["id", "nope"]}, "nope not in the header"),
        ("id,id\n1,2\n", {}, "duplicate column names"),
        ("1,http://x\n", {"header": False, "cols": ["a", "b", "c"]}, "gives 3 names"),
        ("id,url\n", {"delimiter": ";;"}, "one character"),
    ],
)
def test_unusable_csv_gives_one_line_error(tmp_path, text, kwargs, message):
    with pytest.raises(InputError) as info:
        inspect_csv(write(tmp_path, text), **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        inspect_csv(str(tmp_path / "absent.csv"))


@pytest.mark.parametrize("text", ["id,url\n1,a,extra\n2,b\n3\n4,c,d,e\n",
                                  "id,url\n1,a\n2,b,extra\n3\n4,c,d,e\n"])
def test_ragged_rows_are_kept_and_flagged(tmp_path, text):
    """Extra fields in the first row once made pandas shift every column silently."""
    frame = read_blocks(inspect_csv(write(tmp_path, text))).compute()
    assert frame["id"].tolist() == ["1", "2", "3", "4"]
    assert frame["url"].tolist() == ["a", "b", "", "c"]
    ragged = {0: 3, 2: 1, 3: 4} if "a,extra" in text else {1: 3, 2: 1, 3: 4}
    assert frame[INGEST_ERROR].tolist() == [
        f"row has {ragged[i]} fields, the header 2" if i in ragged else "" for i in range(4)]


def test_reserved_column_names_are_refused(tmp_path):
    with pytest.raises(InputError, match="'status' is reserved"):
        inspect_csv(write(tmp_path, "id,status,url\n1,new,a.jpg\n"))
    assert inspect_csv(write(tmp_path, "id,status,url\n1,new,a.jpg\n"),
                       cols=["id", "url"]).keep == ("id", "url")


def test_blanks_and_bad_bytes_survive_as_strings(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,url\n1,\n2,caf\xe9.jpg\n,x.jpg\n")
    frame = read_blocks(inspect_csv(str(path))).compute()
    assert frame["url"].tolist() == ["", "caf\ufffd.jpg", "x.jpg"]
    assert frame["id"].tolist() == ["1", "2", ""]


@given(st.lists(st.integers(0, 40), max_size=12), st.integers(1, 17))
def test_plan_covers_every_row_once_in_order(lengths, partition_rows):
    plan = plan_partitions(lengths, partition_rows)
    covered = [(block, r) for pieces in plan for block, start, stop in pieces
               for r in range(start, stop)]
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
    blocks = read_blocks(source, blocksize=2000)
    lengths = count_rows(blocks)
    assert len(lengths) > 3 and sum(lengths) == 1000
    frames = [d.compute() for d in blocks.to_delayed()]
    parts = [assemble_partition(k * 64, [(frames[b], s, e) for b, s, e in pieces], ["id", "url"])
             for k, pieces in enumerate(plan_partitions(lengths, 64))]
    merged = pd.concat(parts, ignore_index=True)
    assert merged["row"].tolist() == list(range(1000))
    assert merged["id"].tolist() == [str(i) for i in range(1000)]


def test_columns_are_kept_once(tmp_path):
    path = write(tmp_path, "id,title,url\n1,a,b.jpg\n")
    assert inspect_csv(path, cols=["title"], url_col="url", id_col="url").keep == ("title", "url")
    with pytest.raises(InputError, match="--cols names a column twice"):
        inspect_csv(path, cols=["url", "url"])


def test_unknown_protocol_is_one_line_error():
    with pytest.raises(InputError, match="cannot read"):
        inspect_csv("nosuchproto://bucket/in.csv")
