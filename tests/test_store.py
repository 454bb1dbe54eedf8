"""The store on its own: names, --overwrite safety, file modes, the HDF5 export at scale."""

from __future__ import annotations

import errno
import stat
from collections import namedtuple

import h5py
import numpy as np
import pandas as pd
import pytest

from imgsim_dask import store as store_module
from imgsim_dask.errors import StoreError
from imgsim_dask.store import SourceWriter, open_source

from support.store import make_source, plan_for


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "n" * 256, "a\0b"])
def test_bad_source_names_are_one_line_errors(tmp_path, name):
    for call in (
        lambda: open_source(tmp_path, name),
        lambda: make_source(tmp_path, name, np.ones((2, 4), np.float32)),
    ):
        with pytest.raises(StoreError, match="invalid source name") as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_export_streams_past_the_hdf5_attribute_limit(tmp_path):
    # 9,000 row ids no longer fit an HDF5 attribute (64 KiB): they are a dataset now
    rng = np.random.default_rng(0)
    features = rng.standard_normal((9000, 8)).astype(np.float32)
    features[::7] = np.nan  # failed rows are left out of `data`
    source = make_source(tmp_path, "big", features)
    h5, fields = source.export_h5(tmp_path / "big.h5")
    ok = ~np.isnan(features).any(axis=1)
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["data"][:], features[ok])
        assert np.array_equal(f["rows"][:], np.flatnonzero(ok))
        assert f.attrs["model"] == "mobilenet"
    exported = pd.read_csv(fields, sep="\t", dtype=str)
    assert exported["id"].tolist() == [f"big-{i}" for i in np.flatnonzero(ok)]


def test_export_without_room_is_a_one_line_error(tmp_path, monkeypatch):
    source = make_source(tmp_path, "small", np.ones((40, 8), np.float32))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: usage(10, 9, 1))
    with pytest.raises(StoreError, match="needs about 0 MiB, .* has 0 MiB free") as error:
        source.export_h5(tmp_path / "small.h5")
    assert "\n" not in str(error.value) and not (tmp_path / "small.h5").exists()


def test_a_source_that_cannot_be_created_leaves_nothing_behind(tmp_path, monkeypatch):
    """A disk that fills up while plan.json is written (simulated: this test cannot fill a
    disk) must not leave a folder that neither --resume nor --overwrite would take."""
    plan = plan_for(6, 4)

    def disk_full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "atomic_write", disk_full)
        with pytest.raises(StoreError, match="cannot create .*books: No space left on device$"):
            SourceWriter(tmp_path, "books", plan)
    assert list(tmp_path.iterdir()) == []
    assert SourceWriter(tmp_path, "books", plan).done == set()  # a plain retry works


def test_written_files_follow_the_umask(tmp_path):
    old = store_module.os.umask(0o022)
    try:
        source = make_source(tmp_path, "modes", np.ones((6, 4), np.float32))
        h5, fields = source.export_h5(tmp_path / "modes.h5")
    finally:
        store_module.os.umask(old)
    written = [
        source.path / "meta.json",
        source.path / "plan.json",
        h5,
        fields,
        *(source.path / "rows.parquet").glob("part-*.parquet"),
    ]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
    assert set(modes.values()) == {0o644}, modes  # mkstemp alone gives 0600
