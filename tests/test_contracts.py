"""The stage contracts: a stored source's format version, the bounded pipeline both
extraction and matching run under, and the terminal kept free of TensorFlow's chatter."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from imgsim_dask.errors import StoreError
from imgsim_dask.pipeline import bounded
from imgsim_dask.quiet import filtered_native_stderr
from imgsim_dask.schema import FORMAT_VERSION
from imgsim_dask.store import open_source

from support.store import make_source


def _sealed(store, name="old") -> None:
    make_source(store, name, np.ones((2, 3), np.float32))


def test_a_source_records_its_format_and_older_ones_still_open(tmp_path):
    _sealed(tmp_path)
    meta_path = tmp_path / "old" / "meta.json"
    assert json.loads(meta_path.read_text())["format_version"] == FORMAT_VERSION
    document = json.loads(meta_path.read_text())
    del document["format_version"]  # as written before the version was recorded
    meta_path.write_text(json.dumps(document))
    source = open_source(tmp_path, "old")
    assert source.meta.format_version == 1 and source.meta.rows == 2


def test_a_source_of_a_newer_format_is_refused_in_one_line(tmp_path):
    _sealed(tmp_path)
    meta_path = tmp_path / "old" / "meta.json"
    meta_path.write_text(
        json.dumps({**json.loads(meta_path.read_text()), "format_version": FORMAT_VERSION + 1})
    )
    with pytest.raises(StoreError, match="newer imgsim-dask") as error:
        open_source(tmp_path, "old")
    assert "\n" not in str(error.value)


def _slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def test_bounded_keeps_its_window_and_cancels_what_is_left(client):
    submitted, taken = [], []

    def submit(x: int):
        submitted.append(x)
        assert len(submitted) - len(taken) <= 3  # never more than the window in flight
        return client.submit(_slow_square, x, pure=False)

    with bounded(client, range(20), submit, window=3) as finished:
        results = {}
        for x, future in finished:
            taken.append(x)
            results[x] = future.result()
    assert results == {x: x * x for x in range(20)}

    held = []
    with pytest.raises(RuntimeError, match="stop"):
        with bounded(
            client,
            range(20),
            lambda x: held.append(client.submit(_slow_square, x, pure=False)) or held[-1],
            window=4,
        ) as finished:
            for _ in finished:
                raise RuntimeError("stop")
    assert len(held) == 4
    deadline = time.monotonic() + 10
    while sum(f.status == "cancelled" for f in held) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(f.status == "cancelled" for f in held) == 3  # all but the one taken


def test_native_chatter_is_dropped_and_real_lines_kept(capfd, monkeypatch):
    monkeypatch.delenv("IMGSIM_NATIVE_LOGS", raising=False)
    with filtered_native_stderr():
        os.write(
            2,
            b"WARNING: All log messages before absl::InitializeLog() is called are "
            b"written to STDERR\n",
        )
        os.write(
            2,
            b"I0000 00:00:1796 11470 cudart_stub.cc:31] Could not find cuda drivers on "
            b"your machine, GPU will not be used.\n",
        )
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"
    monkeypatch.setenv("IMGSIM_NATIVE_LOGS", "1")  # what -v sets
    with filtered_native_stderr():
        os.write(2, b"Could not find cuda drivers\n")
    assert capfd.readouterr().err == "Could not find cuda drivers\n"


def test_the_package_names_import_when_first_used_and_a_worker_preload_stays_light():
    import subprocess
    import sys

    import imgsim_dask

    assert sorted(imgsim_dask.__all__) == sorted(imgsim_dask._HOMES)
    for name in imgsim_dask.__all__:
        assert getattr(imgsim_dask, name).__name__ == name
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        imgsim_dask.nothing  # noqa: B018
    # each local-cluster worker loads this preload (and, spawned, the CLI's module) at start
    light = "import sys, imgsim_dask.workerinit, imgsim_dask.cli; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    for heavy in ("'pandas'", "'zarr'", "'distributed'", "'tensorflow'"):
        assert heavy not in loaded.stdout
