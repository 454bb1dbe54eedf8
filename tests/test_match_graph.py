"""Matching on a cluster as a graph over the stored features: the workers read B's slices
from the store and keep them, spread so that none holds all of B; A's blocks travel to
them; only pairs leave a score task. With `--out DIR/` the workers also write the pairs,
a Parquet part per block of A, and the driver gets counts."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from distributed import Client, get_task_stream

from imgsim_dask import match_sources, pairs
from imgsim_dask.errors import OptionError
from imgsim_dask.match import available_cpus, engine
from imgsim_dask.options import MatchOptions
from imgsim_dask.store import read_parquet

from support.cli import imgsim
from support.matching import assert_same, exact_units, quantized, reference
from support.store import make_source

N, M = 300, 500
SMALL = dict(block_rows=64, slice_rows=100)  # 5 blocks of A, 5 slices of B
SLICES, BLOCKS = math.ceil(M / SMALL["slice_rows"]), math.ceil(N / SMALL["block_rows"])


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(11)
    return quantized(rng, N), quantized(rng, M)


@pytest.fixture
def sources(tmp_path, features):
    a, b = features
    store = tmp_path / "store"
    extra = {"title": [f"t{i}" for i in range(M)]}
    make_source(store, "left", a, extra={"title": extra["title"][:N]})
    make_source(store, "right", b, extra=extra)
    return store


@pytest.mark.slow
@pytest.mark.cluster
def test_b_is_spread_over_the_workers_and_stays_where_it_was_read(
    process_cluster, sources, features
):
    """Three `dask worker` processes, each tagged GPU: each reads and keeps its own share of
    B's slices (no worker holds all of B), no slice ever moves between workers, each block
    of A is scored once per worker, and the pairs are those of the dense reference."""
    for _ in range(3):
        process_cluster.add_worker("--nthreads", "1", "--resources", "GPU=1")
    a, b = features

    def incoming_keys(dask_worker=None) -> list[str]:  # (local: pickled by value)
        """Keys this worker received from other workers."""
        return [str(key) for log in dask_worker.transfer_incoming_log for key in log["keys"]]

    with Client(process_cluster.address) as client:
        client.wait_for_workers(3, timeout=120)
        for threshold, top_k, self_match in [(0.25, None, False), (None, 3, False),
                                             (0.25, None, True), (0.1, 4, True)]:  # fmt: skip
            options = MatchOptions(threshold=threshold, top_k=top_k, **SMALL)
            with get_task_stream(client) as stream:
                result = match_sources(
                    "left", "left" if self_match else "right", str(sources),
                    cluster=client, options=options,
                )  # fmt: skip
            expected = reference(a, a if self_match else b, threshold, top_k, self_match)
            assert_same(result.pairs[["row_a", "row_b", "similarity"]], expected)

            ran = [(str(task["key"]), task["worker"]) for task in stream.data]
            slices = Counter(worker for key, worker in ran if key.startswith("bslice-"))
            assert sum(slices.values()) == (N if self_match else M) // 100
            assert len(slices) == 3 and max(slices.values()) <= 2, slices
            scores = [key for key, _ in ran if key.startswith("score-")]
            if not (self_match and top_k is None):  # (self threshold skips slices before it)
                assert len(scores) == BLOCKS * 3, scores
        # three scoring workers on one host split its CPUs rather than each taking all
        workers = list(client.scheduler_info()["workers"])
        shares = engine._threads_per_worker(client, workers, None)
        assert set(shares.values()) == {max(1, available_cpus() // 3)}
        moved = [k for keys in client.run(incoming_keys).values() for k in keys]
        assert not [k for k in moved if "bslice-" in k], moved
        assert [k for k in moved if "ablock-" in k], "A's blocks travel to the slices"


@pytest.mark.cluster
@pytest.mark.parametrize(
    "threshold, top_k, self_match",
    [(0.25, None, False), (None, 3, False), (0.25, None, True)],
    ids=["threshold", "top-k", "dedupe"],
)
def test_a_dataset_out_holds_the_same_pairs_as_one_table(
    client, sources, tmp_path, threshold, top_k, self_match
):
    """`out=DIR/`: the workers write one part per block of A, each pair with both rows'
    fields; it reads back as the table a single file gets, and the result holds only counts
    and the best few pairs. A dedupe's groups go to groups.parquet."""
    second = "left" if self_match else "right"
    options = MatchOptions(threshold=threshold, top_k=top_k, **SMALL)
    one = match_sources("left", second, str(sources), cluster=client, options=options)
    with get_task_stream(client) as stream:
        result = match_sources(
            "left", second, str(sources), out=f"{tmp_path}/pairs/", cluster=client, options=options
        )
    out = tmp_path / "pairs"
    assert sorted(p.name for p in out.glob("part-*")) == [
        f"part-000-{i:05d}.parquet" for i in range(BLOCKS)
    ]
    merged_on_workers = [t for t in stream.data if str(t["key"]).startswith("pairs-")]
    assert len(merged_on_workers) == BLOCKS  # each part was written by such a task
    table = read_parquet(out).sort_values(["row_a", "similarity", "row_b"],
                                          ascending=[True, False, True], ignore_index=True)  # fmt: skip
    expected = one.pairs.drop(columns=["group"], errors="ignore")
    pd.testing.assert_frame_equal(table, expected)
    assert result.pair_count == len(one.pairs) > pairs.PREVIEW_ROWS
    assert not result.complete and len(result.pairs) == pairs.PREVIEW_ROWS
    assert result.pairs["similarity"].is_monotonic_decreasing
    assert result.pairs["similarity"].iloc[0] == one.pairs["similarity"].max()
    assert (result.rows1_matched, result.rows2_matched) == (one.rows1_matched, one.rows2_matched)
    record = json.loads((out / pairs.DATASET_RECORD).read_text())
    assert record["sources"] == ["left", second] and record["pairs"] == len(one.pairs)
    if self_match:
        groups = pd.read_parquet(out / pairs.GROUPS).set_index("row")["group"]
        by_row = one.pairs.groupby("row_a")["group"].first()
        assert groups.reindex(by_row.index).tolist() == by_row.tolist()
        assert result.group_count == one.group_count
        assert "group" in result.pairs


def test_a_dataset_out_replaces_an_earlier_one_and_refuses_other_directories(
    client, sources, tmp_path
):
    options = MatchOptions(threshold=0.25, **SMALL)
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "part-00099.parquet").write_bytes(b"stale")
    (out / pairs.DATASET_RECORD).write_text("{}")  # an earlier pairs dataset
    match_sources("left", "right", str(sources), out=out, cluster=client, options=options)
    assert not (out / "part-00099.parquet").exists()
    assert len(list(out.glob("part-*"))) == BLOCKS

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OptionError, match="a directory with other files in it; name a new"):
        match_sources("left", "right", str(sources), out=mine, cluster=client, options=options)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(OptionError, match="top_k within one source gives each pair once only"):
        match_sources("left", "left", str(sources), out=f"{tmp_path}/d/", cluster=client, top_k=3)


def test_a_table_too_big_for_this_process_stops_with_the_remedy(
    client, sources, tmp_path, monkeypatch
):
    """One table held here (no out, or one file) stops, in one line, once the pairs would
    not fit in a share of this process's memory, and says to write a dataset instead."""
    monkeypatch.setattr(pairs, "DRIVER_MEMORY_SHARE", 1e-12)
    with pytest.raises(OptionError, match=r"more than fit here; write a Parquet dataset instead"):
        match_sources(
            "left", "right", str(sources), out=tmp_path / "p.parquet", cluster=client,
            threshold=-1.0, **SMALL,
        )  # fmt: skip
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_match_from_and_into_object_storage(s3, tmp_path):
    """Sources on S3 and `--out s3://.../pairs/`: the workers read the features and write the
    dataset there; the CLI says how many pairs and shows the most similar. (All through
    the CLI: s3fs sessions left in this process would outlive the test's server.)"""
    s3.bucket("imgsim")
    store = "s3://imgsim/st"
    rng = np.random.default_rng(12)
    a, b = exact_units(rng, N), exact_units(rng, M)  # unit rows: imported as they are
    for name, x in (("left", a), ("right", b)):
        np.save(tmp_path / f"{name}.npy", x)
        made = imgsim("import", name, f"{name}.npy", "--store", store, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    done = imgsim(
        "match", "left", "right", "--store", store, "--thresh", "0.25",
        "--out", "s3://imgsim/pairs/", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = reference(a, b, 0.25, None)
    assert f"(showing the 10 most similar of {len(expected)} pairs)" in done.stdout
    assert f"{len(expected)} pairs;" in done.stdout and "-> s3://imgsim/pairs" in done.stdout
    fs = s3.filesystem()
    assert fs.exists("imgsim/pairs/_imgsim.json")
    parts = sorted(p for p in fs.ls("imgsim/pairs") if p.rsplit("/", 1)[1].startswith("part-"))
    assert len(parts) == math.ceil(N / MatchOptions().block_rows)  # (the CLI's blocks)
    got = pd.concat(pd.read_parquet(fs.open(p)) for p in parts)
    assert_same(
        got[["row_a", "row_b", "similarity"]].sort_values(
            ["row_a", "similarity", "row_b"], ascending=[True, False, True], ignore_index=True
        ),
        expected,
    )
    assert not (tmp_path / "s3:").exists()
