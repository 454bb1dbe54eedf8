"""Resume: an extraction whose driver was SIGKILLed continues with --resume to the same store.

The driver runs as a real `imgsim extract` process against the session's local cluster
(`--scheduler`), so killing it leaves the cluster up, as when a laptop's driver dies
while a remote cluster keeps running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from imgsim_dask import ExtractOptions, extract, open_source
from imgsim_dask.errors import StoreError
from imgsim_dask.options import FetchOptions

from support.cli import default_sigint

PARTITION_ROWS = 8
ROWS = 160


@pytest.fixture(scope="module")
def many_rows_csv(tmp_path_factory, image_dir):
    """ROWS local image paths (some missing), enough partitions for a kill to land mid-run."""
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "missing"]
    table = pd.DataFrame(
        {
            "id": [f"img{i}" for i in range(ROWS)],
            "url": [str(image_dir / f"{names[i % len(names)]}.jpg") for i in range(ROWS)],
        }
    )
    path = tmp_path_factory.mktemp("resume") / "many.csv"
    table.to_csv(path, index=False)
    return path


def extract_command(csv, store, scheduler, *extra):
    return [
        sys.executable,
        "-m",
        "imgsim_dask",
        "extract",
        str(csv),
        "--name",
        "books",
        "--store",
        str(store),
        "--weights",
        "random",
        "--partition-rows",
        str(PARTITION_ROWS),
        "--batch-size",
        "4",
        "--scheduler",
        scheduler,
        "--no-progress",
        *extra,
    ]


def written_parts(store: Path) -> int:
    return len(list((store / "books" / "rows.parquet").glob("part-*.parquet")))


def assert_same_store(a, b):
    assert np.array_equal(a.features[:], b.features[:], equal_nan=True)
    pd.testing.assert_frame_equal(a.rows(), b.rows())
    assert a.meta.status_counts == b.meta.status_counts


@pytest.fixture(scope="module")
def clean(client, many_rows_csv, tmp_path_factory):
    """The store of an undisturbed run."""
    return extract(
        str(many_rows_csv),
        "books",
        str(tmp_path_factory.mktemp("clean")),
        cluster=client,
        weights="random",
        partition_rows=PARTITION_ROWS,
        batch_size=4,
    )


@pytest.mark.slow
def test_driver_killed_then_resumed_equals_clean_run(client, many_rows_csv, clean, tmp_path):
    store = tmp_path / "store"
    total = ROWS // PARTITION_ROWS
    driver = subprocess.Popen(
        extract_command(many_rows_csv, store, client.scheduler.address),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while written_parts(store) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    driver.stdout.close()
    written = written_parts(store)
    assert 3 <= written < total, f"the kill should land mid-run, {written} of {total} written"
    with pytest.raises(StoreError, match="continue it with resume, or start over with overwrite"):
        open_source(store, "books")

    resumed = subprocess.run(
        extract_command(many_rows_csv, store, client.scheduler.address, "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    # store tasks the dead driver had started may still have finished on the workers: each
    # wrote a whole partition, which the resumed run keeps
    kept = re.search(r"resuming, (\d+) of (\d+) partitions already written", resumed.stderr)
    assert kept and written <= int(kept[1]) < total and int(kept[2]) == total, resumed.stderr
    assert_same_store(open_source(store, "books"), clean)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_in_one_line_then_resumes(many_rows_csv, clean, tmp_path):
    """A terminal's Ctrl-C reaches the driver and its local cluster's workers (one process
    group): the driver cancels the run and says how to continue, without a traceback from
    the scheduler (cancelling the CSV blocks once failed `assert ts.who_wants` there) or
    from the workers (they leave SIGINT to the driver)."""
    store = tmp_path / "store"
    total = ROWS // PARTITION_ROWS
    command = [*extract_command(many_rows_csv, store, ""), "--workers", "1"]
    command.remove("--scheduler")
    command.remove("")
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 180
    while written_parts(store) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    written = written_parts(store)
    assert driver.returncode == 130, stderr
    assert 2 <= written < total, f"the Ctrl-C should land mid-run, {written} of {total} written"
    # the count is what was on storage when the driver stopped; a store task already running
    # on the worker then may still land its whole partition, which --resume keeps
    said = re.search(
        rf"interrupted with (\d+) of {total} partitions written; continue with", stderr
    )
    assert said and 2 <= int(said[1]) <= written, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(open_source(store, "books"), clean)


def test_partial_partition_is_redone(client, many_rows_csv, clean, tmp_path):
    """A Zarr chunk written without its part file (killed in between) is written again."""
    store = tmp_path / "store"
    options = dict(cluster=client, weights="random", partition_rows=PARTITION_ROWS, batch_size=4)
    source = extract(str(many_rows_csv), "books", str(store), **options)
    (source.path / "meta.json").unlink()
    (source.path / "rows.parquet" / "part-00002.parquet").unlink()
    features = zarr.open_array(source.path / "features.zarr", mode="r+")
    features[2 * PARTITION_ROWS : 3 * PARTITION_ROWS] = 0.5  # a chunk written before the kill
    (source.path / "rows.parquet" / ".part-00003.parquet.tmp").write_bytes(b"half")

    resumed = extract(str(many_rows_csv), "books", str(store), resume=True, **options)
    assert_same_store(resumed, clean)
    assert not list((source.path / "rows.parquet").glob(".*"))


def test_resume_of_complete_store_changes_nothing(client, many_rows_csv, tmp_path):
    options = dict(cluster=client, weights="random", partition_rows=PARTITION_ROWS, batch_size=4)
    first = extract(str(many_rows_csv), "books", str(tmp_path), **options)
    meta = (first.path / "meta.json").read_text()
    again = extract(str(many_rows_csv), "books", str(tmp_path), resume=True, **options)
    assert (again.path / "meta.json").read_text() == meta


def test_resume_refuses_a_different_plan(client, many_rows_csv, tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text(Path(many_rows_csv).read_text())
    options = dict(cluster=client, weights="random", batch_size=4)
    source = extract(str(csv), "books", str(tmp_path), partition_rows=PARTITION_ROWS, **options)
    (source.path / "meta.json").unlink()
    with pytest.raises(
        StoreError,
        match="'books' in .* was made with partition_rows 8, not 16; leave out partition_rows",
    ):
        extract(str(csv), "books", str(tmp_path), partition_rows=16, resume=True, **options)
    with csv.open("a") as f:
        f.write(f"late,{csv}\n")
    with pytest.raises(
        StoreError,
        match="'books' in .* was made from .*in.csv, which has changed since \\(",
    ):
        extract(
            str(csv), "books", str(tmp_path), partition_rows=PARTITION_ROWS, resume=True, **options
        )


def test_resume_never_deletes_a_store_it_did_not_plan(client, many_rows_csv, tmp_path):
    """A directory without plan.json (older version, or not ours) is refused, not wiped."""
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "keep.txt").write_text("mine")
    with pytest.raises(
        StoreError,
        match="books is not an imgsim source .*, so neither resume "
        "nor overwrite touches it: move it away",
    ):
        extract(
            str(many_rows_csv),
            "books",
            str(tmp_path),
            cluster=client,
            weights="random",
            resume=True,
        )
    with pytest.raises(StoreError, match="books is not an imgsim source"):
        open_source(tmp_path, "books")
    assert (tmp_path / "books" / "keep.txt").read_text() == "mine"
    (tmp_path / "books" / "keep.txt").unlink()  # an empty folder may become a source
    (tmp_path / "books" / "meta.json").write_text("{}")  # a source before plan.json existed
    with pytest.raises(StoreError, match="has no plan.json .*; pass overwrite"):
        extract(
            str(many_rows_csv),
            "books",
            str(tmp_path),
            cluster=client,
            weights="random",
            resume=True,
        )


def test_overwrite_never_deletes_a_directory_that_is_not_a_source(client, many_rows_csv, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_text("mine")
    (tmp_path / "notes").write_text("a file where the source would go")
    for name in ("photos", "notes"):
        with pytest.raises(StoreError, match=f"{name} is not an imgsim source") as error:
            extract(
                str(many_rows_csv),
                name,
                str(tmp_path),
                cluster=client,
                weights="random",
                overwrite=True,
            )
        assert "\n" not in str(error.value)
    assert (tmp_path / "photos" / "holiday.jpg").read_text() == "mine"
    assert (tmp_path / "notes").read_text() == "a file where the source would go"


def test_a_new_model_is_named_as_the_reason_a_source_cannot_be_reused(
    client, many_rows_csv, tmp_path
):
    from imgsim_dask import run

    options = ExtractOptions(weights="random", partition_rows=PARTITION_ROWS)
    run(str(many_rows_csv), cluster=client, store=str(tmp_path), top_k=1, options=options)
    with pytest.raises(StoreError, match="made with model 'mobilenet', not 'efficientnet-lite0'"):
        run(
            str(many_rows_csv),
            cluster=client,
            store=str(tmp_path),
            top_k=1,
            options=replace(options, model="efficientnet-lite0"),
        )


def test_run_reuses_a_source_only_for_the_same_csv(client, many_rows_csv, tmp_path):
    from imgsim_dask import run

    csv = tmp_path / "books.csv"
    csv.write_text(Path(many_rows_csv).read_text())
    options = ExtractOptions(weights="random", partition_rows=PARTITION_ROWS)
    first = run(str(csv), cluster=client, store=str(tmp_path / "store"), top_k=1, options=options)
    meta = (tmp_path / "store" / "books" / "meta.json").read_text()
    again = run(str(csv), cluster=client, store=str(tmp_path / "store"), top_k=1, options=options)
    assert (tmp_path / "store" / "books" / "meta.json").read_text() == meta  # reused as it is
    pd.testing.assert_frame_equal(again.pairs, first.pairs)
    with csv.open("a") as f:
        f.write(f"late,{csv}\n")
    with pytest.raises(
        StoreError,
        match="'books' in .* was made from .*books.csv, which has changed since \\(",
    ):
        run(str(csv), cluster=client, store=str(tmp_path / "store"), top_k=1, options=options)


def test_retry_failed_refetches_only_transient_failures(
    client, image_server, tmp_path, monkeypatch
):
    """Rows that met a 503 are fetched again once the server recovers, and only they: a row
    stored `ok` keeps its features even if its URL has gone since. On a source whose driver
    died (no meta.json, a partition missing), the retry also finishes the extraction."""
    server = image_server
    server.down.set()  # /flaky/ paths answer 503 while set
    base = server.base_url
    urls = [
        f"{base}/chelsea.jpg",
        f"{base}/flaky/coffee.jpg",
        f"{base}/missing.jpg",
        f"{base}/rocket.jpg",
        f"{base}/flaky/astronaut.jpg",
        f"{base}/camera.jpg",
    ]
    csv = tmp_path / "in.csv"
    pd.DataFrame({"id": range(len(urls)), "url": urls}).to_csv(csv, index=False)
    options = dict(
        cluster=client,
        weights="random",
        partition_rows=2,
        batch_size=2,
        fetch=FetchOptions(retries=0),
    )
    store = tmp_path / "store"
    first = extract(str(csv), "web", str(store), **options)
    assert first.rows()["status"].tolist() == ["ok", "http_5xx", "http_404", "ok", "http_5xx", "ok"]
    stored_ok = first.features[:][[0, 5]]
    server.down.clear()
    server.gone.update({"/chelsea.jpg", "/camera.jpg"})  # would fail now if fetched again
    server.hits.clear()
    again = extract(str(csv), "web", str(store), retry_failed=True, **options)
    assert sorted(server.hits.elements()) == ["/flaky/astronaut.jpg", "/flaky/coffee.jpg"]
    server.gone.clear()
    clean = extract(str(csv), "clean", str(store), **options)

    server.down.set()
    broken = extract(str(csv), "broken", str(store), **options)
    (broken.path / "meta.json").unlink()  # the driver died before partition 1 was written
    (broken.path / "rows.parquet" / "part-00001.parquet").unlink()
    server.down.clear()
    server.hits.clear()
    finished = extract(str(csv), "broken", str(store), retry_failed=True, **options)
    assert sorted(server.hits.elements()) == [
        "/flaky/astronaut.jpg",
        "/flaky/coffee.jpg",
        "/missing.jpg",
        "/rocket.jpg",
    ]

    # a retry interrupted between a partition's features and its part file (written by a
    # worker, whose disk fills up after the Zarr chunk): the row has new features beside its
    # old status; a plain --resume must finish the retry
    server.down.set()
    extract(str(csv), "halfway", str(store), **options)
    server.down.clear()
    client.run(_fail_part_writes, True)
    try:
        with pytest.raises(StoreError, match="cannot write partition 0 to .*No space left"):
            extract(str(csv), "halfway", str(store), retry_failed=True, **options)
    finally:
        client.run(_fail_part_writes, False)
    halfway = zarr.open_array(store / "halfway" / "features.zarr", mode="r")
    assert not np.isnan(halfway[1]).any()  # coffee's features are in, its status is not
    finished = extract(str(csv), "halfway", str(store), resume=True, **options)
    assert not (finished.path / "retrying").exists()
    for source in (again, finished, open_source(store, "broken")):
        assert source.rows()["status"].tolist() == ["ok", "ok", "http_404", "ok", "ok", "ok"]
        assert source.meta.status_counts == {"http_404": 1, "ok": 5}
        pd.testing.assert_frame_equal(source.rows(), clean.rows())
        assert np.array_equal(source.features[:], clean.features[:], equal_nan=True)
    np.testing.assert_array_equal(again.features[:][[0, 5]], stored_ok)


def _fail_part_writes(on: bool) -> None:
    """On a worker: make writing part file 0 fail as a full disk does (or stop doing so)."""
    from imgsim_dask import store as store_module

    if not on:
        store_module.atomic_write = store_module._real_atomic_write
        return
    store_module._real_atomic_write = store_module.atomic_write

    def failing(path, *args):
        if Path(str(path)).name == "part-00000.parquet":
            raise OSError(28, "No space left on device")
        return store_module._real_atomic_write(path, *args)

    store_module.atomic_write = failing
