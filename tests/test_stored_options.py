"""A source remembers what it was made with: `--resume`, `--retry-failed` and `run` take the
model, weights, partition size and columns from its plan.json, and refuse, in one line that
names the option and both values, an option given anew that differs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from imgsim_dask import extract, open_source, run
from imgsim_dask.errors import StoreError

from support.cli import assert_usage_error, imgsim

pytestmark = pytest.mark.cluster

IMAGES = ["chelsea", "coffee", "rocket", "astronaut", "camera", "missing"]


def write_csv(path, image_dir, url_col="link", rows=12):
    """A CSV whose URL column is not the last one (so the default would pick the wrong one)."""
    pd.DataFrame(
        {
            "sku": [f"s{i}" for i in range(rows)],
            url_col: [str(image_dir / f"{IMAGES[i % len(IMAGES)]}.jpg") for i in range(rows)],
            "title": [f"item {i}" for i in range(rows)],
        }
    ).to_csv(path, index=False)
    return path


def interrupt(source_path, partition=1):
    """What a killed driver leaves: no meta.json, a partition not written."""
    (source_path / "meta.json").unlink()
    (source_path / "rows.parquet" / f"part-{partition:05d}.parquet").unlink()


def test_resume_takes_every_option_from_the_plan(client, image_dir, tmp_path, monkeypatch):
    csv = write_csv(tmp_path / "big.csv", image_dir)
    made = dict(
        model="efficientnet-lite0", weights="random", partition_rows=4, url_col="link",
        image_size=192,
    )  # fmt: skip
    first = extract(str(csv), "big", str(tmp_path), cluster=client, **made)
    features = np.asarray(first.features)
    interrupt(first.path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-cache"))  # nothing to download

    resumed = extract(str(csv), "big", str(tmp_path), cluster=client, resume=True)

    assert (resumed.meta.model, resumed.meta.partition_rows) == ("efficientnet-lite0", 4)
    assert resumed.meta.image_size == 192  # (and the features below were embedded at 192 px)
    assert resumed.meta.url_col == "link" and resumed.meta.weights.startswith("random")
    assert resumed.meta.status_counts == first.meta.status_counts
    np.testing.assert_array_equal(np.asarray(resumed.features), features)


def test_resume_finds_a_weights_file_again(client, image_dir, tmp_path, monkeypatch, mobilenet_h5):
    """The original failure: a MobileNet source made with a weights file, resumed without
    `--weights`, tried to download the ImageNet weights."""
    csv = write_csv(tmp_path / "big.csv", image_dir, rows=8)
    first = extract(
        str(csv), "big", str(tmp_path), cluster=client, weights=str(mobilenet_h5),
        partition_rows=4, url_col="link",
    )  # fmt: skip
    interrupt(first.path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-cache"))

    resumed = extract(str(csv), "big", str(tmp_path), cluster=client, resume=True)

    assert resumed.meta.weights_sha256 == first.meta.weights_sha256
    plan = json.loads((resumed.path / "plan.json").read_text())
    assert plan["weights_file"] == str(mobilenet_h5.resolve())


def test_retry_failed_takes_the_options_from_the_plan(client, image_dir, tmp_path):
    csv = write_csv(tmp_path / "big.csv", image_dir)
    extract(
        str(csv), "big", str(tmp_path), cluster=client, model="efficientnet-lite0",
        weights="random", partition_rows=4, url_col="link",
    )  # fmt: skip
    again = extract(str(csv), "big", str(tmp_path), cluster=client, retry_failed=True)
    assert (again.meta.model, again.meta.partition_rows, again.meta.url_col) == (
        "efficientnet-lite0",
        4,
        "link",
    )


def test_a_differing_option_is_refused_before_the_cluster_starts(image_dir, tmp_path):
    """Refused in one line naming the flag and both values; `cluster=` is an address no
    scheduler listens on, so reaching the cluster would fail differently."""
    csv = write_csv(tmp_path / "big.csv", image_dir, rows=4)
    source = tmp_path / "big"
    source.mkdir()
    plan = {
        "csv": str(csv.resolve()),
        "rows": 4,
        "dim": 1280,
        "partition_rows": 64,
        "model": "efficientnet-lite0",
        "weights": "random (seed 1234)",
        "fetch": {},
        "fields": ["sku", "link", "title"],
        "url_col": "link",
        "id_col": "sku",
        "delimiter": ",",
        "header": True,
    }
    (source / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(StoreError) as error:
        extract(
            str(csv), "big", str(tmp_path), cluster="tcp://127.0.0.1:1", resume=True,
            partition_rows=256,
        )  # fmt: skip
    message = str(error.value)
    assert "'big' in" in message and "\n" not in message
    assert "was made with partition_rows 64, not 256; leave out partition_rows" in message
    assert "csv_bytes" not in message


def test_resume_from_the_command_line(image_dir, tmp_path):
    write_csv(tmp_path / "big.csv", image_dir, rows=8)
    empty_cache = {"KERAS_HOME": str(tmp_path / "no-keras-cache")}

    def extract_big(*options):
        return imgsim(
            "extract", "big.csv", "--name", "big", "--workers", "1", "--no-progress", *options,
            cwd=tmp_path, env=empty_cache,
        )  # fmt: skip

    made = extract_big(
        "--model", "efficientnet-lite0", "--partition-rows", "4", "--url-col", "link",
        "--image-size", "192",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    interrupt(tmp_path / "imgsim-store" / "big")

    assert_usage_error(
        extract_big("--resume", "--partition-rows", "256"),  # the default, given: still refused
        "was made with --partition-rows 4, not 256; leave out --partition-rows to go on",
    )
    assert_usage_error(
        extract_big("--resume", "--url-col", "title"),
        "was made with --url-col 'link', not 'title'",
    )
    assert_usage_error(
        extract_big("--resume", "--image-size", "224"),
        "was made with --image-size 192, not 224; leave out --image-size to go on",
    )
    resumed = extract_big("--resume")
    assert resumed.returncode == 0, resumed.stderr
    meta = open_source(tmp_path / "imgsim-store", "big").meta
    assert (meta.model, meta.partition_rows, meta.url_col) == ("efficientnet-lite0", 4, "link")
    assert meta.image_size == 192


def test_run_reuses_sources_made_with_other_options(client, image_dir, tmp_path, monkeypatch):
    """Both complete, made with efficientnet-lite0 and their own URL columns: `run` without
    options matches them, and resolves no weights."""
    store = str(tmp_path / "store")
    for name, column in (("uploads", "image_url"), ("products", "url")):
        extract(
            str(write_csv(tmp_path / f"{name}.csv", image_dir, url_col=column)), name, store,
            cluster=client, model="efficientnet-lite0", weights="random", url_col=column,
        )  # fmt: skip
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-cache"))
    result = run(
        str(tmp_path / "uploads.csv"), str(tmp_path / "products.csv"), store=store,
        cluster=client, top_k=1,
    )  # fmt: skip
    assert result.rows1_matched == 10  # 12 rows, 2 of them missing files


def test_run_makes_a_new_source_with_the_stored_ones_model(client, image_dir, tmp_path):
    store = str(tmp_path / "store")
    csv = write_csv(tmp_path / "products.csv", image_dir, url_col="url")
    extract(str(csv), "products", store, cluster=client, model="efficientnet-lite0",
            weights="random", url_col="url", image_size=224)  # fmt: skip
    write_csv(tmp_path / "uploads.csv", image_dir, url_col="image_url", rows=6)
    result = run(
        str(tmp_path / "uploads.csv"), str(csv), store=store, cluster=client,
        url_col="image_url,url",
    )  # fmt: skip
    uploads = open_source(store, "uploads").meta
    assert (uploads.model, uploads.url_col, uploads.image_size) == (
        "efficientnet-lite0", "image_url", 224,
    )  # fmt: skip
    assert result.rows1_matched == 5


def test_run_takes_one_url_column_per_csv(image_dir, tmp_path):
    write_csv(tmp_path / "uploads.csv", image_dir, url_col="image_url", rows=4)
    write_csv(tmp_path / "products.csv", image_dir, url_col="url", rows=4)

    def run_both(*options):
        return imgsim(
            "run", "uploads.csv", "products.csv", "--weights", "random", "--model",
            "efficientnet-lite0", "--workers", "1", "--no-progress", *options, cwd=tmp_path,
        )  # fmt: skip

    assert_usage_error(
        run_both("--url-col", "image_url"),
        "products.csv: --url-col 'image_url' is not a column (columns: sku, url, title); "
        "with two CSVs, name each one's column: --url-col A,B",
    )
    assert_usage_error(run_both("--url-col", "a,b,c"), "give one column for all CSVs, or one")
    done = run_both("--url-col", "image_url,url")
    assert done.returncode == 0, done.stderr
    assert "4 of 4 rows of uploads and 4 of 4 rows of products matched" in done.stdout
    assert open_source(tmp_path / "imgsim-store", "products").meta.url_col == "url"
