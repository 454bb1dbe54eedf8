"""A store on object storage (a real S3-compatible server on 127.0.0.1), and on a shared
directory that driver and workers reach from different working directories: the workers
write the partitions, the driver only plan.json and meta.json."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from imgsim_dask import extract, open_source
from imgsim_dask.errors import StoreError

from support.cli import assert_usage_error, imgsim

IMAGES = ["chelsea", "coffee", "rocket", "astronaut", "camera", "missing"]


def write_csv(path, image_dir, rows=12):
    pd.DataFrame(
        {
            "sku": [f"s{i}" for i in range(rows)],
            "url": [str(image_dir / f"{IMAGES[i % len(IMAGES)]}.jpg") for i in range(rows)],
        }
    ).to_csv(path, index=False)
    return path


@pytest.mark.slow
@pytest.mark.cluster
def test_extract_match_resume_and_export_on_s3(s3, image_dir, tmp_path):
    s3.bucket("imgsim")
    store = "s3://imgsim/stores/main"
    write_csv(tmp_path / "in.csv", image_dir)

    def run(*args):
        return imgsim(*args, "--store", store, cwd=tmp_path)

    common = ("--weights", "random", "--partition-rows", "4", "--workers", "1", "--no-progress")
    made = run("extract", "in.csv", "--name", "products", *common)
    assert made.returncode == 0, made.stderr
    assert "products: 12 rows (not_found 2, ok 10)" in made.stdout
    assert not (tmp_path / "s3:").exists()  # never a local folder named like the URL
    fs = s3.filesystem()
    source = "imgsim/stores/main/products"
    assert {p.rsplit("/", 1)[1] for p in fs.ls(f"{source}/rows.parquet")} == {
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
    }  # fmt: skip
    assert fs.exists(f"{source}/meta.json") and fs.exists(f"{source}/features.zarr/zarr.json")

    listed = run("ls")
    assert "products" in listed.stdout and "complete" in listed.stdout, listed.stderr
    info = run("info", "products")
    assert info.returncode == 0 and "s3://imgsim/stores/main/products" in info.stdout, info.stderr
    dupes = run("dedupe", "products", "--thresh", "0.99", "--out", "dupes.csv")
    assert dupes.returncode == 0, dupes.stderr
    pairs = pd.read_csv(tmp_path / "dupes.csv")
    # 10 ok rows, 5 images each listed twice (rows i and i + 6): each copy is found
    assert {(i, i + 6) for i in range(5)} <= set(zip(pairs["row_a"], pairs["row_b"]))
    assert (pairs["similarity"] >= 0.99).all()

    # an interrupted extraction continues on object storage too
    fs.rm(f"{source}/meta.json")
    fs.rm(f"{source}/rows.parquet/part-00001.parquet")
    resumed = run("extract", "in.csv", "--name", "products", "--resume", "--workers", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert len(fs.ls(f"{source}/rows.parquet")) == 3 and fs.exists(f"{source}/meta.json")

    exported = run("export", "products", "--h5", str(tmp_path / "products.h5"))
    assert exported.returncode == 0, exported.stderr
    import h5py

    with h5py.File(tmp_path / "products.h5") as h5:
        assert h5["data"].shape == (10, 1024)
        assert np.allclose(np.linalg.norm(h5["data"][:], axis=1), 1, atol=1e-5)


def test_a_missing_bucket_or_unreachable_store_fails_before_any_cluster(s3, tmp_path, image_dir):
    write_csv(tmp_path / "in.csv", image_dir, rows=2)
    missing = imgsim(
        "extract", "in.csv", "--name", "a", "--store", "s3://no-such-bucket/x", "--weights",
        "random", cwd=tmp_path,
    )  # fmt: skip
    assert_usage_error(missing, "cannot write in store s3://no-such-bucket/x: not found")
    assert "dashboard" not in missing.stderr and not (tmp_path / "s3:").exists()

    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    started = time.monotonic()
    unreachable = imgsim(
        "run", "in.csv", "--store", "s3://imgsim/x", "--weights", "random", cwd=tmp_path,
        env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"},
    )  # fmt: skip
    assert_usage_error(unreachable, "cannot write in store s3://imgsim/x: ")
    assert "check the address and credentials" in unreachable.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_shared_directory_seen_from_another_working_directory(
    process_cluster, tmp_path, image_dir, monkeypatch
):
    """The driver names the store relative to its own directory; the workers (started in
    another one) still write into it, not into a folder of their own."""
    process_cluster.add_worker("--nthreads", "1", "--resources", "GPU=1")
    process_cluster.add_worker("--nthreads", "2", "--resources", "NET=2")
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    write_csv(driver_dir / "in.csv", image_dir, rows=8)
    with Client(process_cluster.address) as client:
        client.wait_for_workers(2, timeout=60)
        workers_cwd = set(client.run(lambda: __import__("os").getcwd()).values())
        assert str(driver_dir) not in workers_cwd
        source = extract("in.csv", "shared", "store", cluster=client, weights="random",
                         partition_rows=4)  # fmt: skip
    assert sorted(p.name for p in (driver_dir / "store" / "shared" / "rows.parquet").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet",
    ]  # fmt: skip
    assert source.meta.status_counts == {"not_found": 1, "ok": 7}
    assert not any((__import__("pathlib").Path(d) / "store").exists() for d in workers_cwd)


def test_workers_that_cannot_see_the_store_stop_the_run(client, tmp_path, image_dir):
    """A `memory://` store lives in the driver's process only: the workers cannot write
    there, which stops the run in one line before any image is fetched."""
    write_csv(tmp_path / "in.csv", image_dir, rows=2)
    with pytest.raises(StoreError) as error:
        extract(str(tmp_path / "in.csv"), "x", "memory://imgsim-test", cluster=client,
                weights="random")  # fmt: skip
    message = str(error.value)
    assert "worker(s) cannot see the store at memory://imgsim-test/x" in message
    assert "use a directory shared with them, or object storage" in message
    assert "\n" not in message
    with pytest.raises(StoreError, match="incomplete"):
        open_source("memory://imgsim-test", "x")
