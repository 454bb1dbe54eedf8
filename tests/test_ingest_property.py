"""Property: whatever the fields, quoting and delimiter, every CSV row lands in rows.parquet once.

Each example is a real extraction on the session's local cluster. The URL column holds
relative paths that do not exist (rows end `not_found` without a model call), so the
property is checked on the full path: Dask blocks -> partitions -> fetch -> row table.
The same rows also parse once and intact whatever the byte blocks (quoted newlines cross
block boundaries).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import dask
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgsim_dask import extract
from imgsim_dask.ingest import inspect_csv, read_blocks
from imgsim_dask.options import CsvOptions

FIELD = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
ROW = st.tuples(FIELD, FIELD, FIELD.map(lambda s: f"nofile/{s}"))  # no scheme: a missing path
DELIMITER = st.sampled_from([",", ";", "\t", "|"])
QUOTING = st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])


def write_csv(path: Path, rows, delimiter: str, quoting: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, quoting=quoting)
        writer.writerow(["id", "title", "url"])
        writer.writerows(rows)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(ROW, min_size=1, max_size=40),
    delimiter=DELIMITER,
    quoting=QUOTING,
    partition_rows=st.integers(1, 9),
)
def test_every_row_appears_once_in_the_row_table(client, rows, delimiter, quoting, partition_rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.csv"
        write_csv(path, rows, delimiter, quoting)
        source = extract(
            str(path),
            "prop",
            str(Path(tmp) / "store"),
            cluster=client,
            delimiter=delimiter,
            weights="random",
            partition_rows=partition_rows,
        )
        table = source.rows()
        assert table["row"].tolist() == list(range(len(rows)))
        assert list(zip(table["id"], table["title"], table["url"])) == rows
        assert set(table["status"]) == {"not_found"}
        assert source.features.shape == (len(rows), 1024)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(ROW, min_size=1, max_size=30),
    delimiter=DELIMITER,
    quoting=QUOTING,
    blocksize=st.integers(1, 120),
)
def test_every_row_parses_once_whatever_the_blocks(rows, delimiter, quoting, blocksize):
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="sync"):
        path = Path(tmp) / "in.csv"
        write_csv(path, rows, delimiter, quoting)
        blocks, lengths = read_blocks(inspect_csv(str(path), CsvOptions(delimiter)), blocksize)
        frame = pd.concat(dask.compute(*blocks))
        assert sum(lengths) == len(rows)
        assert list(zip(frame["id"], frame["title"], frame["url"])) == rows
        assert set(frame["_ingest_error"]) == {""}
