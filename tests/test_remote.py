"""A cluster started the way users start one: `dask scheduler` + `dask worker` processes on 127.0.0.1.

The workers get an empty Keras cache: the weights can only reach them through the plugin
the driver registers, which is how remote workers get them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from imgsim_dask import extract
from imgsim_dask.errors import ImgsimError
from imgsim_dask.models import build_model, resolve_weights

def start(args, env, log):
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def scheduler(tmp_path):
    """A `dask scheduler` process on 127.0.0.1; yields (address, env, tmp dir, processes)."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "worker-keras"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    processes = [start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                        "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                        "--scheduler-file", str(scheduler_file)], env, log)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    yield address, env, log, processes
    # workers first, each to the end, then the scheduler: a worker told to stop while its
    # scheduler is closing can hang in distributed's close (seen 1 run in 4 without this)
    for process in reversed(processes):
        process.terminate()
        process.wait(30)
    log.close()


def add_worker(scheduler, *options):
    address, env, log, processes = scheduler
    processes.append(start([sys.executable, "-m", "distributed.cli.dask_worker", address,
                            "--host", "127.0.0.1", "--no-dashboard", *options], env, log))


def test_weights_travel_to_workers_with_empty_caches(scheduler, tmp_path, monkeypatch,
                                                     mobilenet_h5, image_dir):
    address = scheduler[0]
    add_worker(scheduler, "--nthreads", "1", "--resources", "GPU=1")
    add_worker(scheduler, "--nthreads", "2", "--resources", "NET=2")
    driver_keras = tmp_path / "driver-keras"
    (driver_keras / "models").mkdir(parents=True)
    (driver_keras / "models" / mobilenet_h5.name).write_bytes(mobilenet_h5.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(driver_keras))

    csv = tmp_path / "in.csv"
    pd.DataFrame({"url": [str(image_dir / f"{n}.jpg") for n in ("chelsea", "coffee")]}) \
        .to_csv(csv, index=False)
    with Client(address) as client:
        client.wait_for_workers(2, timeout=60)
        source = extract(str(csv), "remote", str(tmp_path / "store"), client=client)
        assert source.meta["weights"].startswith("keras cache")

    from imgsim_dask.embed import embed_pixels
    from imgsim_dask.fetch import FetchOptions, fetch_partition
    from imgsim_dask.runtime import KerasPredictor

    model = build_model(resolve_weights("mobilenet", str(mobilenet_h5)), str(tmp_path))
    pixels = fetch_partition(pd.read_csv(csv), "url", FetchOptions()).pixels
    assert np.allclose(source.features[:], embed_pixels(KerasPredictor(model), pixels, 64),
                       atol=1e-4)
    assert not (Path(scheduler[1]["KERAS_HOME"]) / "models").exists()


def test_cluster_without_gpu_worker_fails_fast(scheduler, tmp_path, image_dir):
    add_worker(scheduler, "--nthreads", "1")
    csv = tmp_path / "in.csv"
    csv.write_text(f"url\n{image_dir / 'chelsea.jpg'}\n")
    with Client(scheduler[0]) as client:
        client.wait_for_workers(1, timeout=60)
        started = time.monotonic()
        with pytest.raises(ImgsimError, match="no worker has the GPU resource"):
            extract(str(csv), "x", str(tmp_path / "store"), client=client, weights="random")
        assert time.monotonic() - started < 10
