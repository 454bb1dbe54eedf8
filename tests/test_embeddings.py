"""Bring your own embeddings: `imgsim import` makes a source from row vectors (.npy, Zarr,
Parquet) and a table of fields; it matches like an extracted source."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from imgsim_dask import import_features, match_sources, open_source
from imgsim_dask.errors import ImgsimError, InputError, OptionError

from support.cli import assert_usage_error, imgsim


@pytest.fixture
def vectors():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(10, 16)).astype(np.float32)
    data[3] = np.nan  # a broken row
    data[7] = 0.0  # a row of no length
    return data


def test_vectors_become_a_source_with_a_status_per_row(tmp_path, vectors):
    np.save(tmp_path / "v.npy", vectors)
    pd.DataFrame({"sku": [f"p{i}" for i in range(10)], "title": list("abcdefghij")}).to_csv(
        tmp_path / "fields.csv", index=False
    )
    source = import_features(
        "clip", tmp_path / "v.npy", tmp_path / "store", rows=tmp_path / "fields.csv",
        descriptor="clip-vit-b32", partition_rows=4,
    )  # fmt: skip
    assert source.meta.status_counts == {"bad_vector": 2, "ok": 8}
    assert (source.meta.model, source.meta.dim, source.meta.threshold) == ("clip-vit-b32", 16, None)
    table = source.rows()
    assert table["status"].tolist()[3] == table["status"].tolist()[7] == "bad_vector"
    assert table["sku"].tolist() == [f"p{i}" for i in range(10)] and source.meta.id_col == "sku"
    stored = source.features[:]
    assert np.isnan(stored[[3, 7]]).all()
    good = [i for i in range(10) if i not in (3, 7)]
    expected = vectors[good] / np.linalg.norm(vectors[good], axis=1, keepdims=True)
    np.testing.assert_allclose(stored[good], expected, rtol=1e-6)


def test_zarr_and_parquet_vectors_give_the_same_source(tmp_path, vectors):
    np.save(tmp_path / "v.npy", vectors)
    zarr.create_array(tmp_path / "v.zarr", data=vectors, chunks=(3, 16))
    pd.DataFrame({"embedding": list(vectors)}).to_parquet(tmp_path / "list.parquet")
    pd.DataFrame(vectors, columns=[f"d{i}" for i in range(16)]).to_parquet(
        tmp_path / "wide.parquet"
    )
    made = {
        path: import_features(path.replace(".", "-"), tmp_path / path, tmp_path / "store").features[
            :
        ]
        for path in ("v.npy", "v.zarr", "list.parquet", "wide.parquet")
    }
    for features in made.values():
        np.testing.assert_allclose(features, made["v.npy"], rtol=1e-6, atol=1e-7)


def test_imported_sources_match_exactly(tmp_path, client):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 8)).astype(np.float32)
    b = np.concatenate([a[:10] + 0.01 * rng.normal(size=(10, 8)), rng.normal(size=(30, 8))])
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    for name in ("a", "b"):
        import_features(name, tmp_path / f"{name}.npy", tmp_path / "store", descriptor="clip",
                        threshold=0.95)  # fmt: skip
    result = match_sources("a", "b", tmp_path / "store", cluster=client)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    dense = unit(a) @ unit(b).T
    expected = {(int(i), int(j)) for i, j in zip(*np.nonzero(dense >= 0.95))}
    assert set(zip(result.pairs["row_a"], result.pairs["row_b"])) == expected
    assert {(i, i) for i in range(10)} <= expected
    assert "the default of clip" in result.decision()
    assert result.pairs.columns.tolist()[:4] == ["row_a", "row_b", "a_id", "b_id"]


def test_a_source_without_a_threshold_asks_for_one(tmp_path, client):
    np.save(tmp_path / "a.npy", np.eye(4, dtype=np.float32))
    import_features("a", tmp_path / "a.npy", tmp_path / "store")
    with pytest.raises(OptionError, match="a has no default threshold .*: pass threshold"):
        match_sources("a", "a", tmp_path / "store", cluster=client)


def test_vectors_of_other_descriptors_are_not_matched(tmp_path):
    np.save(tmp_path / "a.npy", np.eye(4, dtype=np.float32))
    import_features("a", tmp_path / "a.npy", tmp_path / "store", descriptor="clip")
    import_features("b", tmp_path / "a.npy", tmp_path / "store", descriptor="dino")
    with pytest.raises(ImgsimError, match="cannot match a .*clip.* with b .*dino"):
        match_sources("a", "b", tmp_path / "store", threshold=0.5, cluster="tcp://127.0.0.1:1")


@pytest.mark.parametrize(
    ("array", "rows", "fragment"),
    [
        (np.zeros(5, np.float32), None, "vectors must be a non-empty 2-D array, got shape (5,)"),
        (np.zeros((3, 4), np.float32), "x,y\n1,2\n", "has 1 rows, the vectors 3: one row per"),
        (np.zeros((1, 4), np.float32), "status\n1\n", "column name 'status' is reserved"),
        (np.array([["a", "b"]]), None, "vectors must be numbers"),
    ],
)
def test_bad_vectors_or_fields_are_one_line(tmp_path, array, rows, fragment):
    np.save(tmp_path / "v.npy", array)
    table = None
    if rows is not None:
        (tmp_path / "f.csv").write_text(rows)
        table = tmp_path / "f.csv"
    with pytest.raises(InputError) as error:
        import_features("v", tmp_path / "v.npy", tmp_path / "store", rows=table)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "store" / "v").exists()


@pytest.mark.slow
def test_import_from_the_command_line(tmp_path, vectors):
    np.save(tmp_path / "v.npy", vectors)
    done = imgsim(
        "import", "vecs", "v.npy", "--descriptor", "clip", "--thresh", "0.9", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "vecs: 10 rows (bad_vector 2, ok 8), 16-d clip vectors" in done.stdout
    assert open_source(tmp_path / "imgsim-store", "vecs").meta.threshold == 0.9
    assert_usage_error(
        imgsim("import", "x", "v.txt", cwd=tmp_path), "v.txt: give vectors as .npy, .zarr"
    )
    dupes = imgsim("dedupe", "vecs", "--thresh", "-1", "--top-k", "1", cwd=tmp_path)
    assert dupes.returncode == 0, dupes.stderr
    assert "kept pairs with similarity >= -1 (given)" in dupes.stdout
