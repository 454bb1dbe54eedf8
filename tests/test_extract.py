"""End-to-end extraction on a real local cluster (one GPU-tagged model worker, one fetch worker)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from imgsim_dask import extract, open_source
from imgsim_dask.errors import StoreError

from support.images import SEED_DEMO


@pytest.fixture(scope="module")
def mixed_csv(tmp_path_factory, http_server, image_dir):
    """HTTP URLs, local paths and failures, spread over several partitions."""
    urls = [f"{http_server}/{n}.jpg" for n in ("astronaut", "chelsea", "coffee", "rocket")]
    urls += [
        str(image_dir / "camera.jpg"),
        f"{http_server}/missing.jpg",
        f"{http_server}/notes.jpg",
        "",
        str(image_dir / "chelsea_small.png"),
    ]
    table = pd.DataFrame(
        {
            "id": [f"img{i}" for i in range(len(urls))],
            "caption": [f"caption, {i}" for i in range(len(urls))],
            "url": urls,
        }
    )
    path = tmp_path_factory.mktemp("csv") / "mixed.csv"
    table.to_csv(path, index=False)
    return path, table


def test_extract_mixed_sources(client, mixed_csv, tmp_path):
    path, table = mixed_csv
    source = extract(
        str(path),
        "mixed",
        str(tmp_path),
        cluster=client,
        weights="random",
        partition_rows=4,
        batch_size=3,
    )
    rows = source.rows()
    assert rows["row"].tolist() == list(range(len(table)))
    assert rows["id"].tolist() == table["id"].tolist()
    assert rows["caption"].tolist() == table["caption"].tolist()  # quoted commas survive
    assert rows["status"].tolist() == ["ok"] * 5 + ["http_404", "not_image", "bad_url", "ok"]

    features = source.features[:]
    assert features.shape == (len(table), 1024) and features.dtype == np.float32
    failed = (rows["status"] != "ok").to_numpy()
    assert np.isnan(features[failed]).all()
    assert np.allclose(np.linalg.norm(features[~failed], axis=1), 1.0, atol=1e-5)
    assert source.features.chunks == (4, 1024)

    meta = source.meta
    assert meta.status_counts == {"bad_url": 1, "http_404": 1, "not_image": 1, "ok": 6}
    assert meta.weights.startswith("random") and meta.dim == 1024
    assert meta.stages["fetch"]["task_seconds"] > 0 and meta.stages["embed"]["task_seconds"] > 0
    assert meta.stages["embed"]["images_per_task_second"] > 0
    embed = meta.stages["embed"]  # the one model slot's time in the pipeline, less its tasks'
    assert embed["idle_seconds"] >= 0 and 0 <= embed["idle_share"] < 1
    assert embed["idle_seconds"] + embed["task_seconds"] <= meta.seconds + 1e-3
    spans = client.run_on_scheduler(
        lambda dask_scheduler: [s.name for s in dask_scheduler.extensions["spans"].spans.values()]
    )
    assert {("extract", "mixed", stage) for stage in ("rows", "fetch", "embed")} <= set(spans)

    again = extract(
        str(path),
        "mixed-again",
        str(tmp_path),
        cluster=client,
        weights="random",
        partition_rows=4,
        batch_size=3,
    )
    assert np.array_equal(again.features[:], features, equal_nan=True)  # deterministic

    h5_path = tmp_path / "export" / "mixed.h5"
    h5_path.parent.mkdir()
    h5, fields = source.export_h5(h5_path)
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["data"][:], features[~failed])
        assert (f.attrs["model"], f.attrs["image_size"]) == ("mobilenet", 224)  # how it was made
    exported = pd.read_csv(fields, sep="\t", dtype=str, keep_default_na=False)
    assert exported["id"].tolist() == rows.loc[~failed, "id"].tolist()


def test_existing_name_is_refused_unless_overwrite(client, mixed_csv, tmp_path):
    path, _ = mixed_csv
    extract(str(path), "twice", str(tmp_path), cluster=client, weights="random")
    with pytest.raises(StoreError, match="already exists"):
        extract(str(path), "twice", str(tmp_path), cluster=client, weights="random")
    again = extract(
        str(path), "twice", str(tmp_path), cluster=client, weights="random", overwrite=True
    )
    assert open_source(tmp_path, "twice").meta.rows == again.meta.rows


def test_unknown_and_incomplete_sources(tmp_path):
    with pytest.raises(StoreError, match="no source named"):
        open_source(tmp_path, "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="incomplete"):
        open_source(tmp_path, "half")


@pytest.mark.skipif(not SEED_DEMO.is_dir(), reason="the original's demo images are not here")
def test_demo_covers_group_with_efficientnet(client, tmp_path):
    """The original's demo: 1,2,3 are one book cover, 5,6 another, 4 a different book."""
    csv = tmp_path / "demo.csv"
    csv.write_text("id,url\n" + "".join(f"{i},{SEED_DEMO / f'{i}.jpg'}\n" for i in range(1, 7)))
    source = extract(str(csv), "demo", str(tmp_path), cluster=client, model="efficientnet-lite0")
    features = source.features[:]
    assert features.shape == (6, 1280) and not np.isnan(features).any()
    similarity = features @ features.T
    same = {(0, 1), (0, 2), (1, 2), (4, 5)}
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    worst_same = min(similarity[p] for p in pairs if p in same)
    best_different = max(similarity[p] for p in pairs if p not in same)
    assert worst_same > best_different, (worst_same, best_different)


def test_row_level_problems_become_statuses(client, tmp_path, image_dir):
    """Ragged rows, duplicate ids and blank URLs are rows with a status, not a crash."""
    chelsea = image_dir / "chelsea.jpg"
    csv = tmp_path / "rows.csv"
    # UTF-8: a Latin-1 file is refused as a whole (test_ingest)
    csv.write_bytes(f"id,url\na,{chelsea},extra\na,{chelsea}\nb\nc,\nd,caf\xe9\n".encode())
    source = extract(str(csv), "rows", str(tmp_path), cluster=client, weights="random")
    rows = source.rows()
    assert rows["id"].tolist() == ["a", "a", "b", "c", "d"]
    assert rows["status"].tolist() == ["bad_row", "ok", "bad_row", "bad_url", "not_found"]
    assert rows["error"][0] == "row has 3 fields, the header 2"
    assert "_ingest_error" not in rows
