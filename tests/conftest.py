"""Shared fixtures: real images, a real HTTP server on 127.0.0.1, a real local Dask cluster,
a cluster of `dask scheduler` / `dask worker` processes. The code behind them is in support/.

A guard fails any test whose process tries to connect anywhere but loopback (the worker
processes of the cluster only ever get 127.0.0.1 URLs from these tests).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from PIL import Image

from support.cluster import ProcessCluster
from support.http import LoopbackServer
from support.images import sample_images

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}

# Tests using these (directly or through another fixture) start a Dask cluster.
CLUSTER_FIXTURES = {"client", "process_cluster"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """Mark every test that uses a cluster fixture `cluster` (others are marked by hand)."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test on any attempt to resolve or connect to anything but loopback."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host, *args, **kwargs):
        if (
            host is not None
            and str(host).lower() not in LOOPBACK_NAMES
            and not str(host).startswith("127.")
        ):
            raise AssertionError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not ipaddress.ip_address(host).is_loopback:
                raise AssertionError(f"test tried to connect to non-loopback {host}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """JPEG and PNG files: the samples, plus a resized copy and a text file posing as an image."""
    root = tmp_path_factory.mktemp("images")
    for name, pixels in sample_images().items():
        Image.fromarray(pixels).save(root / f"{name}.jpg", quality=90)
    Image.fromarray(sample_images()["chelsea"]).resize((150, 100)).save(root / "chelsea_small.png")
    (root / "notes.jpg").write_text("this is not an image")
    return root


@pytest.fixture(scope="session")
def http_server(image_dir):
    """A real HTTP server on 127.0.0.1 serving `image_dir` (and the fault endpoints of
    support.http: /status/CODE, /slow/SECONDS, ...); yields its base URL."""
    with LoopbackServer(image_dir) as server:
        yield server.base_url


@pytest.fixture
def image_server(image_dir):
    """A fresh server of `image_dir` per test (fresh hit counters, `down` and `gone`)."""
    with LoopbackServer(image_dir) as server:
        yield server


@pytest.fixture
def fault_server():
    """A fresh fault server per test (fresh hit counters), keep-alive (HTTP/1.1), no files."""
    with LoopbackServer(protocol="HTTP/1.1") as server:
        yield server


@pytest.fixture(scope="session")
def client():
    """A real local cluster: one model worker tagged GPU=1 (1 thread) and one NET fetch worker."""
    from distributed import Client

    from imgsim_dask.cluster import local_cluster

    with (
        local_cluster(fetch_workers=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as dask_client,
    ):
        dask_client.wait_for_workers(2, timeout=120)
        yield dask_client


@pytest.fixture
def process_cluster(tmp_path):
    """A `dask scheduler` process on 127.0.0.1 (files in `tmp_path`), no workers yet: add
    them with `process_cluster.add_worker(...)`. Ends its processes after the test."""
    cluster = ProcessCluster(tmp_path)
    try:
        cluster.start_scheduler()
        yield cluster
    finally:
        cluster.stop()


def _save_legacy_h5(model, path):
    """Write weights in the Keras-applications .h5 layout (what the Keras cache holds)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="session")
def mobilenet_h5(tmp_path_factory):
    """A MobileNet no-top weights file with non-default values (stands in for ImageNet weights)."""
    import keras

    from imgsim_dask.models.mobilenet import WEIGHTS_FILE, build_mobilenet

    keras.utils.set_random_seed(7)
    backbone = build_mobilenet(None).get_layer("mobilenet_1.00_224")
    path = tmp_path_factory.mktemp("keras") / WEIGHTS_FILE
    _save_legacy_h5(backbone, path)
    return path


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server (moto) on 127.0.0.1, reached the standard way: the
    `AWS_*` variables are set for this process and the processes it starts."""
    import s3fs

    from support.s3 import LoopbackS3

    with LoopbackS3() as server:
        s3fs.S3FileSystem.clear_instance_cache()  # none may keep an earlier test's endpoint
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server
