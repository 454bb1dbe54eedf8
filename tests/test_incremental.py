"""Incremental: rows appended to a source (ids continue), and `--new-only` matches that score
only the blocks with added rows into an earlier run's dataset, which then holds exactly
what a full match of the grown sources gives."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import get_task_stream

from imgsim_dask import extract, import_features, match_sources, open_source
from imgsim_dask.errors import InputError, OptionError, StoreError
from imgsim_dask.options import FetchOptions, MatchOptions
from imgsim_dask.store import APPENDS, SourceAppender, read_parquet

from support.cli import imgsim
from support.matching import exact_units, quantized

SMALL = dict(block_rows=32, slice_rows=48)


def vectors(path, x):
    np.save(path, x)
    return path


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def scored_area(tasks: list[dict], dim: int = 8) -> int:
    """A rows x B rows scored, summed over the runs of blocks in a task stream: each run
    (its key's last part) reads its A blocks (`ablock-`) and B slices (`bslice-`)."""
    rows: dict[str, dict[str, int]] = {}
    for task in tasks:
        kind, *_, run = str(task["key"]).split("-")
        if kind in ("ablock", "bslice"):
            count = rows.setdefault(run, {"ablock": 0, "bslice": 0})
            count[kind] += task["nbytes"] // (dim * 4)
    return sum(r["ablock"] * r["bslice"] for r in rows.values())


def pairs_of(path) -> pd.DataFrame:
    """A pairs dataset as one table, in the engine's order."""
    table = read_parquet(path)
    return table.sort_values(
        ["row_a", "similarity", "row_b"], ascending=[True, False, True], ignore_index=True
    )


def test_an_append_continues_the_ids_in_new_partitions(tmp_path):
    rng = np.random.default_rng(3)
    first, more = rng.standard_normal((10, 8)), rng.standard_normal((7, 8))
    store = tmp_path / "store"
    import_features("v", vectors(tmp_path / "a.npy", first), store, partition_rows=4)
    source = import_features("v", vectors(tmp_path / "b.npy", more), store, append=True)

    assert source.meta.rows == 17 and source.meta.status_counts == {"ok": 17}
    np.testing.assert_allclose(source.features[:], unit(np.vstack([first, more])), rtol=1e-6)
    rows = source.rows()
    assert rows["row"].tolist() == list(range(17)) and rows["id"].tolist() == list(range(17))
    parts = sorted(p.name for p in (source.path / "rows.parquet").glob("part-*"))
    assert parts == [f"part-{k:05d}.parquet" for k in range(5)]  # partition 2 topped up
    assert len(read_parquet(source.path / "rows.parquet" / "part-00002.parquet")) == 4
    record = json.loads((source.path / APPENDS).read_text())["appends"]
    assert [(a["first_row"], a["rows"], a["done"]) for a in record] == [(10, 7, True)]
    assert record[0]["from"] == str((tmp_path / "b.npy").resolve())


def test_an_interrupted_append_is_finished_by_running_it_again(tmp_path):
    rng = np.random.default_rng(4)
    first, more = rng.standard_normal((10, 8)), rng.standard_normal((9, 8))
    store = tmp_path / "store"
    import_features("v", vectors(tmp_path / "a.npy", first), store, partition_rows=4)
    appender = SourceAppender(store, "v", str((tmp_path / "b.npy").resolve()), 9)
    vectors(tmp_path / "b.npy", more)
    appender.start()  # ... and killed before it wrote anything or sealed
    with pytest.raises(StoreError, match="incomplete"):
        open_source(store, "v")
    with pytest.raises(StoreError, match="an append to 'v' of 9 rows from .*b.npy was interrupted"):
        import_features("v", vectors(tmp_path / "c.npy", more[:2]), store, append=True)
    source = import_features("v", tmp_path / "b.npy", store, append=True)
    assert source.meta.rows == 19
    np.testing.assert_allclose(source.features[:], unit(np.vstack([first, more])), rtol=1e-6)


def test_an_append_must_fit_the_source(tmp_path):
    store = tmp_path / "store"
    import_features("v", vectors(tmp_path / "a.npy", np.ones((4, 8))), store)
    with pytest.raises(InputError, match="v holds 8-d imported vectors; cannot append 6-d"):
        import_features("v", vectors(tmp_path / "b.npy", np.ones((4, 6))), store, append=True)
    pd.DataFrame({"sku": list("abcd")}).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(InputError, match="v has the fields id; the rows to append have sku"):
        import_features("v", tmp_path / "a.npy", store, rows=tmp_path / "f.csv", append=True)
    with pytest.raises(OptionError, match="an append keeps v's threshold"):
        import_features("v", tmp_path / "a.npy", store, threshold=0.9, append=True)
    assert open_source(store, "v").meta.rows == 4


@pytest.mark.cluster
@pytest.mark.parametrize(
    "threshold, top_k, self_match",
    [(0.25, None, False), (None, 2, False), (0.25, None, True)],
    ids=["threshold", "top-k", "dedupe"],
)
def test_new_only_adds_what_a_full_match_of_the_grown_sources_has(
    client, tmp_path, threshold, top_k, self_match
):
    """old + new, matched in full, is the earlier result plus the --new-only one: the same
    pairs with the same similarities (top-k: the old rows' lists merged with new
    candidates), while --new-only scores only blocks with added rows."""
    rng = np.random.default_rng(5)
    a, b = exact_units(rng, 220), exact_units(rng, 250)
    store = tmp_path / "store"
    import_features("a", vectors(tmp_path / "a0.npy", a[:150]), store, partition_rows=16)
    import_features("b", vectors(tmp_path / "b0.npy", b[:200]), store, partition_rows=16)
    second = "a" if self_match else "b"
    options = MatchOptions(threshold=threshold, top_k=top_k, **SMALL)
    out = f"{tmp_path}/pairs/"
    if threshold is not None:  # (similarities are multiples of 1/4: keep it selective)
        options = replace(options, threshold=0.5)
    match_sources("a", second, store, out=out, cluster=client, options=options)

    import_features("a", vectors(tmp_path / "a1.npy", a[150:200]), store, append=True)
    import_features("b", vectors(tmp_path / "b1.npy", b[200:230]), store, append=True)
    new_only = replace(options, new_only=True)
    with get_task_stream(client) as stream:
        added = match_sources("a", second, store, out=out, cluster=client, options=new_only)
    with get_task_stream(client) as full_stream:
        full = match_sources(
            "a", second, store, out=f"{tmp_path}/full/", cluster=client, options=options
        )

    pd.testing.assert_frame_equal(pairs_of(tmp_path / "pairs"), pairs_of(tmp_path / "full"))
    assert added.total_pairs == full.pair_count
    assert 0 < added.pair_count < full.pair_count
    # what was scored: per run of blocks, its A rows x its B rows (from the tasks' outputs)
    # (new A rows x all of B, then old A rows x new B rows; self: all rows x new rows)
    assert scored_area(stream.data) == (200 * 50 if self_match else 50 * 230 + 150 * 30)
    assert scored_area(full_stream.data) == 200 * (200 if self_match else 230)
    record = json.loads((tmp_path / "pairs" / "_imgsim.json").read_text())
    assert record["rows"] == [200, 200 if self_match else 230]
    if self_match:
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "pairs" / "_groups.parquet"),
            pd.read_parquet(tmp_path / "full" / "_groups.parquet"),
        )

    # a second append and --new-only: the earlier rows are not scored twice
    import_features("a", vectors(tmp_path / "a2.npy", a[200:]), store, append=True)
    import_features("b", vectors(tmp_path / "b2.npy", b[230:]), store, append=True)
    match_sources("a", second, store, out=out, cluster=client, options=new_only)
    match_sources("a", second, store, out=f"{tmp_path}/full/", cluster=client, options=options)
    pd.testing.assert_frame_equal(pairs_of(tmp_path / "pairs"), pairs_of(tmp_path / "full"))


@pytest.mark.cluster
def test_new_only_refuses_what_it_cannot_add_to(client, tmp_path):
    rng = np.random.default_rng(6)
    store = tmp_path / "store"
    import_features("a", vectors(tmp_path / "a.npy", quantized(rng, 40)), store)
    import_features("b", vectors(tmp_path / "b.npy", quantized(rng, 40)), store)
    out = f"{tmp_path}/pairs/"
    with pytest.raises(OptionError, match="new_only adds to the Parquet dataset of an earlier"):
        match_sources("a", "b", store, out=tmp_path / "p.parquet", threshold=0.2, new_only=True)
    common = dict(out=out, cluster=client, **SMALL)
    match_sources("a", "b", store, threshold=0.2, **common)
    with pytest.raises(OptionError, match="was matched with threshold 0.2, not 0.3"):
        match_sources("a", "b", store, threshold=0.3, new_only=True, **common)
    import_features("b", tmp_path / "a.npy", store, overwrite=True)
    with pytest.raises(OptionError, match="as they were then; new_only adds to the same sources"):
        match_sources("a", "b", store, threshold=0.2, new_only=True, **common)


@pytest.mark.slow
@pytest.mark.cluster
def test_the_command_line_appends_and_adds_new_pairs(tmp_path):
    rng = np.random.default_rng(7)
    x = quantized(rng, 120)
    vectors(tmp_path / "old.npy", x[:100])
    vectors(tmp_path / "new.npy", x[100:])

    def run(*args):
        done = imgsim(*args, "--store", "st", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("import", "v", "old.npy", "--thresh", "0.3")
    run("dedupe", "v", "--out", "dupes/")
    said = run("import", "v", "new.npy", "--append")
    assert "v: 120 rows (ok 120)" in said
    said = run("dedupe", "v", "--out", "dupes/", "--new-only")
    assert "pairs added (" in said and " in all); " in said, said
    again = run("dedupe", "v", "--out", "again/")
    total = int(again.split(" pairs;")[0].rsplit("\n", 1)[-1])
    assert f"({total} in all)" in said, (said, again)


def image_csv(path, image_dir, names, start=0):
    pd.DataFrame(
        {
            "sku": [f"s{start + i}" for i in range(len(names))],
            "url": [str(image_dir / f"{n}.jpg") for n in names],
        }
    ).to_csv(path, index=False)
    return str(path)


IMAGES = ["chelsea", "coffee", "rocket", "astronaut", "camera", "missing"]
EXTRACT = dict(weights="random", partition_rows=4, batch_size=3)


@pytest.mark.cluster
def test_extract_append_gives_what_one_extraction_of_both_csvs_gives(client, image_dir, tmp_path):
    """10 rows, then 7 appended (the first 2 top up partition 2): the source is the one a
    single extraction of all 17 rows makes, its CSV and earlier rows untouched; the
    append takes the options it was made with, so they need not be repeated."""
    first = image_csv(tmp_path / "first.csv", image_dir, (IMAGES * 2)[:10])
    more = image_csv(tmp_path / "more.csv", image_dir, (IMAGES * 2)[10:] + IMAGES[:5], 10)
    both = tmp_path / "both.csv"
    pd.concat([pd.read_csv(first), pd.read_csv(more)]).to_csv(both, index=False)
    store = tmp_path / "store"
    extract(first, "p", str(store), cluster=client, **EXTRACT)
    grown = extract(more, "p", str(store), cluster=client, append=True)
    whole = extract(str(both), "whole", str(store), cluster=client, **EXTRACT)

    assert grown.meta.rows == 17 and grown.meta.csv == str(Path(first).resolve())
    assert grown.meta.status_counts == whole.meta.status_counts
    # (equal up to float rounding: an image's batch-mates differ between the two)
    np.testing.assert_allclose(grown.features[:], whole.features[:], atol=1e-5)
    columns = ["row", "sku", "url", "status", "error", "sha256"]
    pd.testing.assert_frame_equal(grown.rows()[columns], whole.rows()[columns])
    record = json.loads((grown.path / APPENDS).read_text())["appends"]
    assert [(a["first_row"], a["rows"], a["from"]) for a in record] == [
        (10, 7, str(Path(more).resolve()))
    ]


@pytest.mark.cluster
def test_extract_append_refuses_what_it_cannot_add(client, image_dir, tmp_path):
    first = image_csv(tmp_path / "first.csv", image_dir, IMAGES)
    more = image_csv(tmp_path / "more.csv", image_dir, IMAGES[:2], 6)
    store = str(tmp_path / "store")
    extract(first, "p", store, cluster=client, **EXTRACT)
    with pytest.raises(StoreError, match="no source named 'q' in store .* \\(known: p\\)"):
        extract(more, "q", store, cluster=client, append=True)
    with pytest.raises(StoreError, match="was made with partition_rows 4, not 8; leave out"):
        extract(more, "p", store, cluster=client, append=True, partition_rows=8)
    with pytest.raises(OptionError, match="append excludes overwrite, resume and retry_failed"):
        extract(more, "p", store, cluster=client, append=True, resume=True)
    pd.DataFrame({"sku": ["x"], "link": ["y"]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(OptionError, match="url"):
        extract(str(tmp_path / "other.csv"), "p", store, cluster=client, append=True)
    # an append interrupted (recorded, nothing written): resume and other appends wait for it
    SourceAppender(store, "p", str(Path(more).resolve()), 2).start()
    with pytest.raises(StoreError, match="was interrupted; finish it by running that append"):
        extract(first, "p", store, cluster=client, resume=True)
    finished = extract(more, "p", store, cluster=client, append=True)
    assert finished.meta.rows == 8


@pytest.mark.cluster
def test_retry_failed_fetches_the_failed_rows_of_every_appended_csv_again(
    client, image_server, tmp_path
):
    """6 rows, then 5 appended (rows 6-7 top up partition 1): rows that met a 503 in either
    CSV, two of them in the shared partition, are fetched again from their own CSV once the
    server recovers, and only they; the source ends as one clean extraction of both."""
    server, base = image_server, image_server.base_url
    server.down.set()  # /flaky/ paths answer 503 while set
    first_urls = [f"{base}/{n}.jpg" for n in ("chelsea", "coffee", "rocket", "astronaut", "camera")]
    first_urls[1] = f"{base}/flaky/coffee.jpg?csv=first"
    first_urls.append(f"{base}/flaky/rocket.jpg?csv=first")  # row 5, partition 1
    more_urls = [f"{base}/astronaut.jpg", f"{base}/flaky/camera.jpg?csv=more"]  # row 7: partition 1
    more_urls += [f"{base}/missing.jpg", f"{base}/flaky/chelsea.jpg?csv=more", f"{base}/coffee.jpg"]
    (tmp_path / "later").mkdir()
    first, more = tmp_path / "first.csv", tmp_path / "later" / "more.csv"
    pd.DataFrame({"sku": range(6), "url": first_urls}).to_csv(first, index=False)
    pd.DataFrame({"sku": range(6, 11), "url": more_urls}).to_csv(more, index=False)
    store = str(tmp_path / "store")
    options = dict(cluster=client, fetch=FetchOptions(retries=0))
    extract(str(first), "p", store, **EXTRACT, **options)
    grown = extract(str(more), "p", store, append=True, **options)
    failed = grown.rows()["status"].tolist()
    assert [i for i, s in enumerate(failed) if s == "http_5xx"] == [1, 5, 7, 9]
    untouched = grown.features[:][[0, 2, 3, 4, 6, 10]]

    server.down.clear()
    server.hits.clear()
    retried = extract(str(first), "p", store, retry_failed=True, **options)
    assert sorted(server.hits.elements()) == sorted(
        [
            "/flaky/coffee.jpg?csv=first",
            "/flaky/rocket.jpg?csv=first",
            "/flaky/camera.jpg?csv=more",
            "/flaky/chelsea.jpg?csv=more",
        ]
    )
    statuses = retried.rows()["status"].tolist()
    assert statuses == ["ok"] * 8 + ["http_404", "ok", "ok"]
    assert retried.meta.rows == 11 and retried.meta.status_counts == {"http_404": 1, "ok": 10}
    assert retried.rows()["sku"].tolist() == [str(i) for i in range(11)]
    np.testing.assert_array_equal(retried.features[:][[0, 2, 3, 4, 6, 10]], untouched)
    clean_csv = tmp_path / "clean.csv"
    pd.DataFrame({"url": [u.replace("/flaky", "") for u in first_urls + more_urls]}).to_csv(
        clean_csv, index=False
    )
    clean = extract(str(clean_csv), "clean", store, **EXTRACT, **options)
    ok = [i for i, s in enumerate(statuses) if s == "ok"]
    np.testing.assert_allclose(retried.features[:][ok], clean.features[:][ok], atol=1e-5)
    assert [a["done"] for a in json.loads((retried.path / APPENDS).read_text())["appends"]] == [
        True
    ]

    meta = (retried.path / "meta.json").read_bytes()
    server.hits.clear()
    extract(str(first), "p", store, retry_failed=True, **options)  # nothing left to retry
    assert not server.hits and (retried.path / "meta.json").read_bytes() == meta

    # a retry interrupted before it wrote a row (as `SourceWriter.reopen` leaves the source):
    # --resume goes on with it, over the appended rows too
    server.down.set()
    extract(str(first), "q", store, **EXTRACT, **options)
    extract(str(more), "q", store, append=True, **options)
    server.down.clear()
    (Path(store) / "q" / "retrying").touch()
    (Path(store) / "q" / "meta.json").unlink()
    resumed = extract(str(first), "q", store, resume=True, **options)
    assert resumed.rows()["status"].tolist() == statuses and resumed.meta.rows == 11

    more.write_text(more.read_text() + f"11,{base}/rocket.jpg\n")
    with pytest.raises(InputError, match="more.csv: 6 rows, but 5 were appended from it"):
        extract(str(first), "p", store, retry_failed=True, **options)
    more.unlink()
    with pytest.raises(InputError, match="rows 6-10 of 'p' were appended from a CSV that cannot"):
        extract(str(first), "p", store, retry_failed=True, **options)
