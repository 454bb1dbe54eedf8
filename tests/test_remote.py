"""A cluster started the way users start one: `dask scheduler` + `dask worker` processes on 127.0.0.1.

The cluster is conftest's `process_cluster` (support/cluster.py). The workers get an empty
Keras cache: the weights can only reach them through the plugin the driver registers, which
is how remote workers get them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from imgsim_dask import extract
from imgsim_dask.errors import ImgsimError
from imgsim_dask.models import build_model, resolve_weights


@pytest.mark.slow
def test_weights_travel_to_workers_with_empty_caches(
    process_cluster, tmp_path, monkeypatch, mobilenet_h5, image_dir
):
    address = process_cluster.address
    process_cluster.add_worker("--nthreads", "1", "--resources", "GPU=1")
    process_cluster.add_worker("--nthreads", "2", "--resources", "NET=2")
    driver_keras = tmp_path / "driver-keras"
    (driver_keras / "models").mkdir(parents=True)
    (driver_keras / "models" / mobilenet_h5.name).write_bytes(mobilenet_h5.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(driver_keras))

    csv = tmp_path / "in.csv"
    pd.DataFrame({"url": [str(image_dir / f"{n}.jpg") for n in ("chelsea", "coffee")]}).to_csv(
        csv, index=False
    )
    with Client(address) as client:
        client.wait_for_workers(2, timeout=60)
        source = extract(str(csv), "remote", str(tmp_path / "store"), cluster=client)
        assert source.meta.weights.startswith("keras cache")

    from imgsim_dask.embed import embed_pixels
    from imgsim_dask.fetch import fetch_partition
    from imgsim_dask.options import FetchOptions
    from imgsim_dask.runtime import KerasPredictor

    model = build_model(resolve_weights("mobilenet", str(mobilenet_h5)), str(tmp_path))
    pixels = fetch_partition(pd.read_csv(csv), "url", FetchOptions()).pixels
    assert np.allclose(
        source.features[:], embed_pixels(KerasPredictor(model), pixels, 64), atol=1e-4
    )
    assert not (Path(process_cluster.env["KERAS_HOME"]) / "models").exists()


def test_cluster_without_gpu_worker_fails_fast(process_cluster, tmp_path, image_dir):
    process_cluster.add_worker("--nthreads", "1")
    csv = tmp_path / "in.csv"
    csv.write_text(f"url\n{image_dir / 'chelsea.jpg'}\n")
    with Client(process_cluster.address) as client:
        client.wait_for_workers(1, timeout=60)
        started = time.monotonic()
        with pytest.raises(ImgsimError, match="no worker has the GPU resource"):
            extract(str(csv), "x", str(tmp_path / "store"), cluster=client, weights="random")
        assert time.monotonic() - started < 10
