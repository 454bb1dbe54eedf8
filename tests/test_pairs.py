"""Matching stored sources: the result table, self-match groups, `run` end to end, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from imgsim_dask.demo import serve_directory, write_csvs
from imgsim_dask.errors import InputError, StoreError
from imgsim_dask.options import ClusterOptions, ExtractOptions
from imgsim_dask.pairs import match_sources
from imgsim_dask.workflow import run

from support.cli import assert_usage_error, imgsim
from support.store import make_source


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(3)
    b = unit(rng.normal(size=(10, 64)))
    a = unit(rng.normal(size=(7, 64)))
    a[0] = unit(b[[2]] + 0.05 * rng.normal(size=(1, 64)))[0]  # near-duplicate of b2
    a[3] = b[5]  # exact copy of b5
    a[6] = np.nan  # a failed row
    make_source(tmp_path, "a", a)
    make_source(tmp_path, "b", b)
    return tmp_path, a, b


def test_threshold_table_has_fields_of_both_rows(client, sources, tmp_path):
    store, a, b = sources
    out = tmp_path / "pairs.csv"
    result = match_sources("a", "b", str(store), out=out, cluster=client)
    table = result.pairs
    assert list(table.columns) == ["row_a", "row_b", "a_id", "a_url", "b_id", "b_url", "similarity"]
    assert table[["a_id", "b_id"]].values.tolist() == [["a-0", "b-2"], ["a-3", "b-5"]]
    assert table["similarity"].iloc[1] == pytest.approx(1.0, abs=1e-5)
    assert (result.rows1_matched, result.rows2_matched) == (2, 2)
    written = pd.read_csv(out, dtype={"a_id": str})
    assert written["a_id"].tolist() == ["a-0", "a-3"]
    assert "2 pairs" in result.summary()


def test_top1_reproduces_the_originals_iteration(client, sources):
    store, a, b = sources
    result = match_sources("a", "b", str(store), top_k=1, threshold=0.845, cluster=client)
    dense = np.nan_to_num(a, nan=0) @ b.T
    best = dense.argmax(axis=1)
    expected = [
        (i, int(best[i]))
        for i in range(len(a))
        if not np.isnan(a[i]).any() and dense[i, best[i]] >= 0.845
    ]
    assert list(zip(result.pairs["row_a"], result.pairs["row_b"])) == expected


def test_self_match_groups(client, tmp_path):
    rng = np.random.default_rng(5)
    x = unit(rng.normal(size=(9, 32)))
    x[4] = x[1]
    x[7] = x[1]
    x[8] = x[2]
    make_source(tmp_path, "s", x)
    result = match_sources("s", "s", str(tmp_path), threshold=0.99, cluster=client)
    pairs = set(zip(result.pairs["row_a"], result.pairs["row_b"]))
    assert pairs == {(1, 4), (1, 7), (4, 7), (2, 8)}
    groups = dict(zip(result.pairs["row_a"], result.pairs["group"]))
    assert groups == {1: 1, 4: 1, 2: 2}
    assert {"s_a_id", "s_b_id", "group"} <= set(result.pairs.columns)
    assert result.rows1_matched == 5  # rows 1, 2, 4, 7, 8, whichever side they are on
    # within one source a pair claims a near-duplicate: --top-k alone keeps the model's
    # threshold (0.845), so rows with no copy are not grouped with their nearest neighbour
    nearest = match_sources("s", "s", str(tmp_path), top_k=1, cluster=client)
    assert set(zip(nearest.pairs["row_a"], nearest.pairs["row_b"])) <= pairs
    assert set(nearest.pairs["row_a"]) | set(nearest.pairs["row_b"]) == {1, 2, 4, 7, 8}
    anything = match_sources("s", "s", str(tmp_path), top_k=1, threshold=-1, cluster=client)
    assert set(anything.pairs["row_a"]) | set(anything.pairs["row_b"]) == set(range(9))
    assert result.summary().startswith(
        "4 pairs; 5 of 9 rows of s matched; 2 groups, 3 rows are extra copies;"
    )


def test_bad_match_requests(client, sources, tmp_path):
    store, a, b = sources
    make_source(store, "wide", unit(np.ones((2, 128))), model="efficientnet-lite0")
    with pytest.raises(InputError, match="extract both with one model"):
        match_sources("a", "wide", str(store), cluster=client)
    make_source(store, "tuned", a, weights=("file test", "y"))
    make_source(store, "random", a, weights=("random (seed 1234)", ""))
    for other in ("tuned", "random"):
        with pytest.raises(InputError, match="different weights are not comparable"):
            match_sources("a", other, str(store), cluster=client)
    make_source(store, "random2", b, weights=("random (seed 1234)", ""))
    assert len(match_sources("random", "random2", str(store), top_k=1, cluster=client).pairs) == 6
    make_source(store, "old", a, weights=("package p (w.pth)", ""))  # before it had a hash
    make_source(store, "new", b, weights=("package p (w.pth)", "5793"))
    assert len(match_sources("old", "new", str(store), top_k=1, cluster=client).pairs) == 6
    with pytest.raises(InputError, match=r"outside \[-1, 1\]"):
        match_sources("a", "b", str(store), threshold=1.5, cluster=client)
    with pytest.raises(StoreError, match="no source named 'zz'"):
        match_sources("a", "zz", str(store), cluster=client)
    with pytest.raises(InputError, match="does not exist"):
        match_sources("a", "b", str(store), out=tmp_path / "no" / "dir.csv", cluster=client)
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match="afile is not a directory"):
        match_sources("a", "b", str(store), out=tmp_path / "afile" / "x.csv", cluster=client)
    csv = tmp_path / "b.csv"  # as if b had been extracted from it
    csv.write_text("id,url\n")
    meta = json.loads((store / "b" / "meta.json").read_text())
    (store / "b" / "meta.json").write_text(json.dumps({**meta, "csv": str(csv)}))
    with pytest.raises(InputError, match="is the CSV a source was extracted from"):
        match_sources("a", "b", str(store), out=str(csv), cluster=client)
    assert csv.read_text() == "id,url\n"


def test_colliding_column_names_are_refused_before_scoring(client, sources, monkeypatch):
    store, a, b = sources
    make_source(store, "row", a, extra={"a": list("abcdefg")})  # row + _a is the fixed `row_a`
    make_source(store, "shop", b, extra={"new_id": list(range(10))})  # shop_ + new_id ...
    make_source(store, "shop_new", b)  # ... and shop_new_ + id
    cases = [("row", "b", "row_a (source names 'row' and 'b'"), ("shop", "shop_new", "shop_new_id")]
    with monkeypatch.context() as patched:
        patched.setattr("imgsim_dask.pairs.match_features", pytest.fail)  # refused before scoring
        for name1, name2, fragment in cases:
            with pytest.raises(
                InputError, match=f"two columns named {re.escape(fragment)}"
            ) as error:
                match_sources(name1, name2, str(store), top_k=1, cluster=client)
            assert "\n" not in str(error.value) and "rename" in str(error.value)
    (store / "shop_new").rename(store / "shop_new1")  # the remedy the error names
    table = match_sources("shop", "shop_new1", str(store), top_k=1, cluster=client).pairs
    assert {"shop_new_id", "shop_new1_id"} <= set(table.columns) and len(table) == 10


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["match", "a", "nope"], "no source named 'nope'"),
        (["match", "a", "b", "--thresh", "2"], "outside [-1, 1]"),
        (["match", "a", "b", "--out", "/proc/forbidden/x.parquet"], "does not exist"),
        (["match", "a", "b", "--out", "/proc/x.parquet"], "cannot write in /proc: "),
        (["match", "a", "b", "--out", "x.txt"], "use a .csv or .parquet"),
        (["match", "a", "wide"], "extract both with one model"),
        (
            ["match", "a", "tuned"],
            "(weights: file test, sha256 x) with tuned (weights: file test,"
            " sha256 z): features of different weights are not comparable",
        ),
    ],
)
def test_match_cli_errors(sources, args, fragment):
    store, a, _ = sources
    make_source(store, "wide", unit(np.ones((2, 128))), model="efficientnet-lite0")
    make_source(store, "tuned", a, weights=("file test", "z"))
    assert_usage_error(imgsim(*args, "--store", store, cwd=store), fragment)


def test_run_checks_both_csvs_before_extracting_either(client, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("id,url\n1,a.jpg\n")
    with pytest.raises(InputError, match="missing.csv.*no such file"):
        run(
            str(good),
            str(tmp_path / "missing.csv"),
            store=str(tmp_path / "store"),
            cluster=client,
            options=ExtractOptions(weights="random"),
        )
    with pytest.raises(StoreError, match="invalid source name"):
        run(
            str(good),
            str(good),
            names=["ok", "../escape"],
            store=str(tmp_path / "store"),
            cluster=client,
            options=ExtractOptions(weights="random"),
        )
    assert not (tmp_path / "store").exists()  # nothing was extracted


@pytest.mark.slow
def test_run_end_to_end_over_http(client, tmp_path):
    """`run` on the demo set served over HTTP: every edited copy finds its original."""
    root = tmp_path / "demo"
    (root / "images").mkdir(parents=True)
    with serve_directory(root / "images") as base_url:
        catalogue, uploads = write_csvs(root, base_url)
        result = run(
            str(uploads),
            str(catalogue),
            ["uploads", "catalogue"],
            str(root / "store"),
            out=root / "matches.parquet",
            top_k=1,
            threshold=0.70,
            cluster=client,
            options=ExtractOptions(model="efficientnet-lite0", partition_rows=8),
        )
    table = pd.read_parquet(root / "matches.parquet")
    assert {"uploads_id", "uploads_title", "uploads_url", "catalogue_id", "similarity"} <= set(
        table.columns
    )
    copies = pd.read_csv(uploads)
    expected = {
        row.id: "cat-" + row.id.split("-")[1]
        for row in copies.itertuples()
        if row.title.endswith(")")
    }
    assert dict(zip(table["uploads_id"], table["catalogue_id"])) == expected
    assert result.rows1_matched == len(expected)
    meta = json.loads((root / "store" / "uploads" / "meta.json").read_text())
    assert meta["model"] == "efficientnet-lite0"


def test_a_small_match_with_nothing_asked_of_the_cluster_scores_here(client, sources, monkeypatch):
    store, _, _ = sources
    on_cluster = match_sources("a", "b", str(store), threshold=0.5, cluster=client)

    def no_cluster(cluster=None):
        raise AssertionError("a cluster was started for a small match")

    monkeypatch.setattr("imgsim_dask.pairs.connect", no_cluster)  # asserts it is not called
    here = match_sources("a", "b", str(store), threshold=0.5)
    pd.testing.assert_frame_equal(here.pairs, on_cluster.pairs)
    assert len(here.pairs) >= 2  # the near-duplicate and the copy
    for asked in (ClusterOptions(workers=1), ClusterOptions(report="r.html"), client):
        with pytest.raises(AssertionError, match="a cluster was started"):
            match_sources("a", "b", str(store), threshold=0.5, cluster=asked)
    monkeypatch.setattr("imgsim_dask.pairs.IN_PROCESS_CELLS", 7 * 10 - 1)  # a row too many
    with pytest.raises(AssertionError, match="a cluster was started"):
        match_sources("a", "b", str(store), threshold=0.5)
