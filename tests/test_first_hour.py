"""What a new user meets in the first hour: listing a store, its failed rows, what decided a
match, places that are wrong, the demo's leftovers and help texts (issue 14)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from imgsim_dask import extract

from support.cli import assert_usage_error, default_sigint, imgsim

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ["chelsea", "coffee", "rocket", "astronaut", "camera", "missing", "coins"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_dir, client):
    """A store with a complete source `products` (sku,name,url; one missing file, one that
    is not an image) and an interrupted one, `half`."""
    root = tmp_path_factory.mktemp("first-hour")
    names = ["chelsea", "coffee", "rocket", "astronaut", "camera", "missing", "notes"]
    pd.DataFrame(
        {
            "sku": [f"sku{i}" for i in range(len(names))],
            "name": [f"product {n}" for n in names],
            "url": [str(image_dir / f"{n}.jpg") for n in names],
        }
    ).to_csv(root / "products.csv", index=False)
    for name in ("products", "half"):
        extract(
            str(root / "products.csv"), name, str(root / "store"), cluster=client,
            weights="random", partition_rows=4,
        )  # fmt: skip
    (root / "store" / "half" / "meta.json").unlink()
    return root


def test_ls_lists_every_source_with_its_counts(store):
    result = imgsim("ls", "--store", "store", cwd=store)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "name", "rows", "ok", "failed", "model", "descriptor", "features", "made", "(UTC)",
        "state",
    ]  # fmt: skip
    half = next(line for line in lines if line.split()[0] == "half")
    assert "incomplete: --resume continues it" in half and "mobilenet" in half
    products = next(line for line in lines if line.split()[0] == "products").split()
    assert products[1:7] == ["7", "5", "2", "mobilenet", "avg", "1024-d"]
    assert products[-1] == "complete"
    # `info` without a name lists the store too, instead of "Missing argument"
    info = imgsim("info", "--store", "store", cwd=store)
    assert info.returncode == 0 and "products" in info.stdout and "imgsim info NAME" in info.stdout


def test_ls_and_info_name_a_store_that_does_not_exist(store):
    assert_usage_error(
        imgsim("ls", "--store", "nostore", cwd=store), "no store at nostore: it does not exist"
    )
    assert_usage_error(
        imgsim("info", "products", "--store", "nostore", cwd=store),
        "no store at nostore: it does not exist; --store names the directory extract wrote",
    )


def test_failures_shows_counts_examples_and_errors(store):
    result = imgsim("failures", "products", "--store", "store", cwd=store)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "not_found: 1 of 7 rows" in out and "not_image: 1 of 7 rows" in out
    assert "sku5" in out and "no such file" in out and "sku6" in out
    assert "sku0" not in out  # ok rows are no failures

    only = imgsim("failures", "products", "--store", "store", "--status", "not_found", cwd=store)
    assert "sku5" in only.stdout and "sku6" not in only.stdout

    written = imgsim("failures", "products", "--store", "store", "--out", "failed.csv", cwd=store)
    assert written.returncode == 0, written.stderr
    table = pd.read_csv(store / "failed.csv")
    assert sorted(table["sku"]) == ["sku5", "sku6"]
    assert {"name", "url", "status", "error", "http_status"} <= set(table.columns)

    assert_usage_error(
        imgsim("failures", "products", "--store", "store", "--status", "timeout", cwd=store),
        "products has no rows of status 'timeout' (statuses: not_found, not_image, ok)",
    )


def test_the_result_says_what_decided_it(store):
    """The threshold and where it came from, the id and other fields of both rows (not
    only `_id`/`_title` columns), and how many pairs the preview leaves out."""
    result = imgsim("dedupe", "products", "--store", "store", "--thresh", "-1", cwd=store)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].split() == [
        "products_a_sku", "products_a_name", "products_b_sku", "products_b_name", "similarity",
        "group",
    ]  # fmt: skip
    assert "showing" not in result.stdout  # all 10 pairs are shown
    assert "kept pairs with similarity >= -1 (given)" in out
    assert "10 pairs; 5 of 5 rows of products matched" in result.stdout

    best = imgsim("dedupe", "products", "--store", "store", "--top-k", "1", cwd=store)
    assert best.returncode == 0, best.stderr
    assert (
        "kept pairs with similarity >= 0.845 (the default of mobilenet, avg), "
        "at most the 1 best per row of products"
    ) in best.stdout


def test_a_preview_longer_than_ten_pairs_says_so(tmp_path, image_dir, client):
    pd.DataFrame(
        {"id": range(6), "url": [str(image_dir / f"{IMAGES[i % 5]}.jpg") for i in range(6)]}
    ).to_csv(tmp_path / "six.csv", index=False)
    extract(str(tmp_path / "six.csv"), "six", str(tmp_path / "store"), cluster=client,
            weights="random")  # fmt: skip
    result = imgsim("dedupe", "six", "--store", "store", "--thresh", "-1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(showing 10 of 15 pairs; --out FILE writes them all)" in result.stdout
    assert result.stdout.splitlines()[0].split()[:2] == ["six_a_id", "six_a_url"]


def test_an_unwritable_store_fails_before_any_cluster_starts(store):
    """/proc takes no new files, even for root (as CI runs)."""
    for command in (
        ["extract", "products.csv", "--name", "p", "--weights", "random"],
        ["run", "products.csv", "--weights", "random"],
    ):
        result = imgsim(*command, "--store", "/proc/imgsim-store", cwd=store)
        assert_usage_error(result, "cannot write in store /proc/imgsim-store (it would be made in")
        assert "dashboard" not in result.stderr


def test_resume_of_a_complete_source_says_nothing_was_done(store):
    result = imgsim(
        "extract", "products.csv", "--name", "products", "--store", "store", "--resume", cwd=store
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("products: already complete, nothing done: 7 rows")
    assert "images/s" not in result.stdout
    assert "dashboard" not in result.stderr  # no cluster was started for nothing


def test_the_demo_leaves_csvs_that_work_afterwards():
    assert "imgsim-demo/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow
def test_demo_csvs_list_local_paths(tmp_path):
    from imgsim_dask.demo import write_csvs

    served, _ = write_csvs(tmp_path, "http://127.0.0.1:1")
    local = pd.read_csv(tmp_path / "catalogue.csv")
    assert all((tmp_path / url).is_file() for url in local["url"])
    assert pd.read_csv(served)["url"].str.startswith("http://127.0.0.1:1/").all()


def test_help_offers_only_what_applies():
    for command in ("match", "dedupe"):
        text = imgsim(command, "-h").stdout
        assert "--workers" not in text  # matching runs on the GPU workers only
        assert "--dashboard-address" in text and "--keep-cluster" in text
    assert "between two sources" not in imgsim("dedupe", "-h").stdout
    assert "--workers" in imgsim("extract", "-h").stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keep_cluster_keeps_the_dashboard_up_after_the_job(store):
    port = free_port()
    job = subprocess.Popen(
        [sys.executable, "-m", "imgsim_dask", "dedupe", "products", "--store", "store",
         "--dashboard-address", f"127.0.0.1:{port}", "--keep-cluster", "120"],
        cwd=store, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=default_sigint,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "dashboard stays up" not in line and time.monotonic() < deadline:
            line = job.stderr.readline()
            assert line or job.poll() is None, job.stderr.read()
        assert f"http://127.0.0.1:{port}/status" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as page:
            assert page.status == 200
        job.send_signal(signal.SIGINT)  # what ends the wait
        out, _ = job.communicate(timeout=60)
        assert job.returncode == 0
        assert "pairs; 5 of 5 rows of products matched" in out
    finally:
        if job.poll() is None:
            job.kill()
