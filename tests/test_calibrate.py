"""`imgsim calibrate` end to end on the local cluster, its refusals, `--save` feeding match,
the edit family, and sources of different descriptors or input sizes refused for matching."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from imgsim_dask import extract, match_sources, open_source
from imgsim_dask.calibrate import MIN_ROWS, _how_made, calibrate
from imgsim_dask.calibrate.benchmark import build_set, originals
from imgsim_dask.calibrate.edits import SINGLE_EDITS, edited_copies, region
from imgsim_dask.errors import InputError
from imgsim_dask.models import get_spec

from support.cli import assert_usage_error, imgsim
from support.http import LoopbackServer

# Thresholds at which docs/accuracy.md's benchmark (efficientnet-lite0, rmac-trim) has
# precision >= 0.9 and recall >= 0.85 for both match and dedupe.
BENCHMARK_BOUNDS = (0.535, 0.76)
MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    """The accuracy benchmark without its copies: its photographs, their blown-up regions
    and the faces (`calibrate` makes the copies)."""
    root = tmp_path_factory.mktemp("benchmark")
    table = build_set(root, seed=0, per_edit=0, combos=0)
    assert set(table["kind"]) == {"original", "negative"}
    return root


def write_csv(path, server: LoopbackServer, files: list[str]):
    pd.DataFrame({"id": range(len(files)), "url": [server.url(f"/{f}") for f in files]}).to_csv(
        path, index=False
    )


def test_every_edit_makes_an_rgb_image_and_copies_are_reproducible():
    photo = originals()[0][1]
    copies = edited_copies(photo, np.random.default_rng(7), per_edit=1, combos=2)
    assert [name for name, _ in copies[: len(SINGLE_EDITS)]] == list(SINGLE_EDITS)
    assert all(copy.mode == "RGB" and min(copy.size) >= 16 for _, copy in copies)
    again = edited_copies(photo, np.random.default_rng(7), per_edit=1, combos=2)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(copies, again)
    )
    assert region(photo, np.random.default_rng(0)).size == photo.size


@pytest.mark.slow
def test_calibrate_recommends_a_threshold_within_the_benchmarks_bounds_and_match_uses_it(
    tmp_path, benchmark_dir, client
):
    store = tmp_path / "store"
    with LoopbackServer(benchmark_dir) as server:
        files = sorted(p.name for p in benchmark_dir.glob("*.jpg"))
        write_csv(tmp_path / "photos.csv", server, files)
        extract(str(tmp_path / "photos.csv"), "photos", str(store), cluster=client, model=MODEL)
        result = calibrate("photos", str(store), sample=48, save=True, cluster=client)
    assert result.fetched == result.sampled >= MIN_ROWS
    assert result.positives == 16 * result.fetched  # 14 single edits and 2 combinations each
    assert result.negatives == result.positives * (result.fetched - 1)
    low, high = BENCHMARK_BOUNDS
    assert low <= result.threshold <= high, result.table
    assert result.precision >= 0.95
    assert result.table["recall"].is_monotonic_decreasing  # fewer pairs kept as it rises
    assert result.table["precision"].between(0, 1).all()
    saved = json.loads((store / "photos" / "meta.json").read_text())["calibration"]
    assert (
        saved["threshold"] == pytest.approx(result.threshold)
        and saved["positives"] == result.positives
    )
    matched = match_sources("photos", "photos", str(store), cluster=client)
    assert matched.threshold == pytest.approx(result.threshold)
    assert matched.threshold_from == "imgsim calibrate of photos"
    given = match_sources("photos", "photos", str(store), cluster=client, threshold=0.9)
    assert given.threshold == 0.9 and given.threshold_from == "given"
    dedupe = imgsim(
        "dedupe", "photos", "--store", str(store), "--scheduler", client.scheduler.address
    )
    assert dedupe.returncode == 0, dedupe.stderr
    assert f">= {result.threshold:g} (imgsim calibrate of photos)" in dedupe.stdout
    info = imgsim("info", "photos", "--store", str(store))
    assert f"threshold {result.threshold:.3f} (imgsim calibrate of photos)" in info.stdout


@pytest.mark.slow
def test_calibrate_refuses_too_few_rows_and_images_gone(tmp_path, benchmark_dir, client):
    store = tmp_path / "store"
    with LoopbackServer(benchmark_dir) as server:
        files = sorted(p.name for p in benchmark_dir.glob("*.jpg"))
        write_csv(tmp_path / "few.csv", server, files[:5])
        write_csv(tmp_path / "all.csv", server, files)
        extract(str(tmp_path / "few.csv"), "few", str(store), cluster=client, model=MODEL)
        extract(str(tmp_path / "all.csv"), "all", str(store), cluster=client, model=MODEL)
    with pytest.raises(InputError, match=r"^few has 5 ok row\(s\); calibrate needs at least 20"):
        calibrate("few", str(store), cluster=client)
    assert_usage_error(
        imgsim("calibrate", "few", "--store", str(store)), "few has 5 ok row(s); calibrate needs"
    )
    # the server is gone: nothing can be fetched again
    with pytest.raises(InputError) as info:
        calibrate("all", str(store), sample=48, cluster=client)
    message = str(info.value)
    assert "\n" not in message and message.startswith("all: only 0 of 48 sampled images")
    assert "connection_error" in message


@pytest.mark.slow
def test_sources_of_different_descriptors_are_refused_in_one_line(tmp_path, benchmark_dir, client):
    store = tmp_path / "store"
    with LoopbackServer(benchmark_dir) as server:
        files = sorted(p.name for p in benchmark_dir.glob("*.jpg"))[:4]
        write_csv(tmp_path / "a.csv", server, files)
        extract(str(tmp_path / "a.csv"), "a", str(store), cluster=client, model=MODEL)
        extract(str(tmp_path / "a.csv"), "b", str(store), cluster=client, model=MODEL,
                descriptor="avg")  # fmt: skip
    assert open_source(store, "a").meta.descriptor == "rmac-trim/v1"
    assert open_source(store, "b").meta.descriptor == "avg/v1"
    result = imgsim("match", "a", "b", "--store", str(store))
    assert_usage_error(result, "descriptor")
    assert result.stderr.strip() == (
        "imgsim: error: cannot match a (descriptor rmac-trim/v1) with b (descriptor "
        "avg/v1): extract one again with --descriptor avg (or the other with rmac-trim) "
        "and --overwrite"
    )


@pytest.mark.slow
def test_sources_of_different_input_sizes_are_refused_in_one_line(tmp_path, benchmark_dir, client):
    """Each size has its own threshold and model (calibrate embeds copies at the source's
    size); the same image at two sizes is similar, but not the same vector."""
    store = tmp_path / "store"
    with LoopbackServer(benchmark_dir) as server:
        files = sorted(p.name for p in benchmark_dir.glob("*.jpg"))[:4]
        write_csv(tmp_path / "a.csv", server, files)
        a = extract(str(tmp_path / "a.csv"), "a", str(store), cluster=client, model=MODEL,
                    image_size=224)  # fmt: skip
        small = extract(str(tmp_path / "a.csv"), "small", str(store), cluster=client,
                        model=MODEL)  # fmt: skip
    assert (a.meta.image_size, small.meta.image_size) == (224, 160)  # 160: the model's own
    spec = get_spec(MODEL)
    assert small.meta.threshold == spec.threshold == 0.63
    assert a.meta.threshold == spec.threshold_for("rmac-trim", 224) == 0.65
    cosines = np.sum(np.asarray(a.features) * np.asarray(small.features), axis=1)
    assert 0.8 < cosines.min() and cosines.max() < 0.9999, cosines
    fetch, _, pooling = _how_made(a)
    assert (fetch.image_size, fetch.trim_borders, pooling) == (224, True, "rmac")
    result = imgsim("match", "a", "small", "--store", str(store))
    assert_usage_error(result, "px")
    assert result.stderr.strip() == (
        "imgsim: error: cannot match a (224 px model input) with small (160 px): extract "
        "one again with --image-size 160 (or the other with 224) and --overwrite"
    )
    info = imgsim("info", "small", "--store", str(store))
    assert "descriptor rmac-trim/v1 at 160 px" in info.stdout
