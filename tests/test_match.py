"""The matching engine against a brute-force dense reference, in-process and on a real cluster.

Most data here are small multiples of 1/8 in few dimensions: every dot product is then exact
in float32 whatever the summation order, so pair sets and similarities must equal the
reference exactly, and ties (duplicate rows, equal scores) are everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgsim_dask.errors import ImgsimError, InputError
from imgsim_dask.match import (
    GroupForest,
    connected_groups,
    estimate_pairs,
    kernel,
    match_features,
    score_block,
    valid_rows,
)
from imgsim_dask.options import MatchOptions

from support.matching import MODES, assert_same, quantized, reference, score_blocks


def unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- the kernel, directly ------------------------------------------------------------------

SCORERS = ["numpy", "keras"]  # keras: Keras ops (TensorFlow here) on its device, the CPU here


@pytest.mark.parametrize("threshold,top_k", MODES)
@pytest.mark.parametrize("self_match", [False, True])
@pytest.mark.parametrize("scorer", SCORERS)
def test_score_block_equals_reference(threshold, top_k, self_match, scorer, monkeypatch):
    monkeypatch.setattr(kernel, "MIN_ROWS_PER_THREAD", 4)  # exercise the threaded split
    monkeypatch.setattr(kernel, "_PARTITION_ROWS", 5)
    rng = np.random.default_rng(7)
    a = quantized(rng, 53)
    b = a if self_match else quantized(rng, 41)
    a[[3, 30]] = np.nan
    b[5] = 0.0
    options = MatchOptions(threshold=threshold, top_k=top_k, block_rows=17, slice_rows=9, threads=3)
    assert_same(
        score_blocks(a, b, options, self_match, scorer),
        reference(a, b, threshold, top_k, self_match),
    )


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_score_block_random_shapes(data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n, m = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    dim = data.draw(st.integers(1, 6))
    self_match = data.draw(st.booleans())
    top_k = data.draw(st.one_of(st.none(), st.integers(1, 8)))
    choices = [-1.0, 0.0, 0.125, 0.3]
    threshold = data.draw(
        st.sampled_from(choices)
        if top_k is None
        else st.one_of(st.none(), st.sampled_from(choices))
    )
    a = quantized(rng, n, dim)
    b = a if self_match else quantized(rng, m, dim)
    if data.draw(st.booleans()):
        a[rng.integers(0, n)] = np.nan
    options = MatchOptions(
        threshold=threshold,
        top_k=top_k,
        block_rows=data.draw(st.integers(1, 12)),
        slice_rows=data.draw(st.integers(1, 12)),
        threads=2,
    )
    scorer = data.draw(st.sampled_from(SCORERS))
    assert_same(
        score_blocks(a, b, options, self_match, scorer),
        reference(a, b, threshold, top_k, self_match),
    )


@pytest.mark.parametrize("scorer", SCORERS)
def test_score_block_unit_vectors(scorer):
    rng = np.random.default_rng(3)
    a, b = unit(rng, 300, 32), unit(rng, 200, 32)
    options = MatchOptions(threshold=0.45, block_rows=128, slice_rows=70)
    got = score_blocks(a, b, options, False, scorer)
    assert len(got) > 20
    assert_same(got, reference(a, b, 0.45, None), exact=False)


@pytest.mark.parametrize("scorer", SCORERS)
def test_zero_and_nan_rows_never_match_even_at_minus_one(scorer):
    a = np.array([[1, 0], [0, 0], [np.nan, 1]], np.float32)
    b = np.array([[0, 0], [np.nan, np.nan], [0, 1]], np.float32)
    rows_a, rows_b, sims = score_block(a, 10, [b], [0], -1.0, None, False, scorer=scorer)
    assert (rows_a.tolist(), rows_b.tolist(), sims.tolist()) == ([10], [2], [0.0])
    rows_a, _, _ = score_block(a, 0, [b], [0], None, 5, False, scorer=scorer)
    assert rows_a.tolist() == [0]


@pytest.mark.parametrize("scorer", SCORERS)
def test_ties_break_on_smaller_row_b(scorer):
    a = np.ones((1, 4), np.float32) / 2
    b = np.ones((10, 4), np.float32) / 2
    slices, starts = [b[:3], b[3:7], b[7:]], [0, 3, 7]
    rows_a, rows_b, _ = score_block(a, 0, slices, starts, None, 4, False, scorer=scorer)
    assert rows_b.tolist() == [0, 1, 2, 3]
    rows_a, rows_b, _ = score_block(b, 0, slices, starts, None, 2, True, scorer=scorer)
    pairs = set(zip(rows_a.tolist(), rows_b.tolist()))
    # row 0 takes 1, 2; rows 1, 2 take 0 and the other; row j >= 3 takes 0, 1
    assert pairs == {(0, 1), (0, 2), (1, 2)} | {(0, j) for j in range(3, 10)} | {
        (1, j) for j in range(3, 10)
    }


@pytest.mark.parametrize("scorer", SCORERS)
def test_identical_unit_rows_score_within_minus_one_and_one(scorer):
    # float32 rounding puts x.x of a stored (unit-norm) row a few 1e-7 past 1 and x.(-x)
    # past -1: similarities are clipped, so -1 keeps every pair and none exceeds 1
    rng = np.random.default_rng(12)
    a = unit(rng, 200, 1024)
    b = np.concatenate([a, -a])
    raw = a @ b.T
    assert raw.max() > 1 and raw.min() < -1  # the rounding this test is about
    rows_a, rows_b, sims = score_block(a, 0, [b], [0], -1.0, None, False, scorer=scorer)
    assert len(rows_a) == a.shape[0] * b.shape[0]
    assert sims.max() == 1.0 and sims.min() == -1.0
    _, rows_b, sims = score_block(a, 0, [b[:150], b[150:]], [0, 150], None, 1, False, scorer=scorer)
    assert rows_b.tolist() == list(range(200)) and (sims > 1 - 1e-6).all()


def test_top_k_beyond_b_costs_no_memory_and_changes_nothing():
    import tracemalloc

    rng = np.random.default_rng(13)
    a, b = unit(rng, 100, 16), unit(rng, 5, 16)
    tracemalloc.start()
    huge = score_blocks(a, b, MatchOptions(top_k=10**12, block_rows=64, slice_rows=4), False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20  # rows x k buffers are sized by B's 5 rows, not by k
    assert_same(huge, reference(a, b, None, 5), exact=False)
    assert_same(match_features(a, b, MatchOptions(top_k=10**12)), huge, exact=False)
    # --max-pairs bounds top-k by n x min(k, m): 500 pairs here, however large k is
    assert len(match_features(a, b, MatchOptions(top_k=100, max_pairs=500))) == 500
    with pytest.raises(ImgsimError, match=r"more than max_pairs 499: raise threshold \(or raise"):
        match_features(a, b, MatchOptions(top_k=100, max_pairs=499))  # --top-k is already set


def test_top_k_over_many_tied_columns_stays_in_bounded_memory():
    # a catalogue full of one placeholder image: every column ties with every other
    import tracemalloc

    rng = np.random.default_rng(14)
    a = quantized(rng, 512, 64)  # exact dot products: the ties are exact
    a[~valid_rows(a)] = 0.125
    peaks = {}
    for name, b in (("random", unit(rng, 2048, 64)), ("tied", np.repeat(a[:1], 2048, axis=0))):
        tracemalloc.start()
        rows_a, rows_b, _ = score_block(a, 0, [b], [0], None, 1, False, threads=1)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(rows_a) == 512
    assert rows_b.tolist() == [0] * 512  # ties go to the smallest row of B
    assert peaks["tied"] < 1.5 * peaks["random"], peaks


# -- match_features on the cluster ----------------------------------------------------------


@pytest.mark.parametrize("threshold,top_k", MODES[:3])
@pytest.mark.parametrize("self_match", [False, True])
@pytest.mark.parametrize("scorer", SCORERS)
def test_match_features_on_cluster(client, threshold, top_k, self_match, scorer):
    rng = np.random.default_rng(11)
    a = quantized(rng, 101)
    b = a if self_match else quantized(rng, 67)
    a[[0, 50]] = np.nan
    options = MatchOptions(
        threshold=threshold, top_k=top_k, block_rows=23, slice_rows=16, scorer=scorer
    )
    got = match_features(a, b, options, client=client, self_match=self_match)
    expected = reference(a, b, threshold, top_k, self_match)
    assert len(expected) > 0
    assert_same(got, expected)
    assert_same(match_features(a, b, options, client=None, self_match=self_match), expected)


def test_match_features_unit_vectors_on_cluster(client):
    rng = np.random.default_rng(5)
    a, b = unit(rng, 700, 48), unit(rng, 500, 48)
    b[:40] = a[100:140]  # exact duplicates across the sources
    options = MatchOptions(threshold=0.4, block_rows=256, slice_rows=300)
    got = match_features(a, b, options, client=client)
    assert {(100 + i, i) for i in range(40)} <= set(zip(got.row_a, got.row_b))
    assert_same(got, reference(a, b, 0.4, None), exact=False)
    top = match_features(a, b, MatchOptions(top_k=2, block_rows=256, slice_rows=300), client=client)
    assert len(top) == 2 * len(a) and (top.groupby("row_a").size() == 2).all()
    assert (
        top[top.row_a.between(100, 139)].groupby("row_a").head(1).row_b.to_numpy() == np.arange(40)
    ).all()
    spans = client.run_on_scheduler(
        lambda dask_scheduler: [s.name for s in dask_scheduler.extensions["spans"].spans.values()]
    )
    assert ("match", "score") in spans  # the dashboard groups score tasks under one span


def test_match_features_zarr_sources(client, tmp_path):
    import zarr

    rng = np.random.default_rng(2)
    data_a, data_b = quantized(rng, 90), quantized(rng, 70)
    a = zarr.create_array(tmp_path / "a.zarr", shape=data_a.shape, chunks=(32, 8), dtype="f4")
    b = zarr.create_array(tmp_path / "b.zarr", shape=data_b.shape, chunks=(32, 8), dtype="f4")
    a[:], b[:] = data_a, data_b
    options = MatchOptions(threshold=0.2, block_rows=40, slice_rows=25, max_pairs=10**6)
    assert_same(match_features(a, b, options, client=client), reference(data_a, data_b, 0.2, None))


def test_edge_sources(client):
    rng = np.random.default_rng(4)
    b = quantized(rng, 30)
    one = b[7:8].copy()
    options = MatchOptions(threshold=0.2, top_k=5, block_rows=8, slice_rows=8)
    assert_same(match_features(one, b, options, client=client), reference(one, b, 0.2, 5))
    assert_same(match_features(b, one, options, client=client), reference(b, one, 0.2, 5))
    assert match_features(one, one, options, client=client, self_match=True).empty
    nothing = match_features(b, b, MatchOptions(threshold=1.0), client=client, self_match=True)
    assert nothing.empty and nothing.dtypes.tolist() == [np.int64, np.int64, np.float32]
    failed = np.full((12, 8), np.nan, np.float32)
    assert match_features(failed, b, MatchOptions(threshold=-1.0), client=client).empty
    assert match_features(
        failed, failed, MatchOptions(top_k=3), client=client, self_match=True
    ).empty
    assert match_features(b[:0], b, options, client=client).empty


@pytest.mark.cluster
def test_no_gpu_worker_is_one_line_error():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            processes=False,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address=None,
            resources={"NET": 2},
        ) as cluster,
        Client(cluster) as no_gpu,
    ):
        with pytest.raises(ImgsimError, match="no worker has the GPU resource") as error:
            match_features(
                np.ones((2, 2), np.float32),
                np.ones((2, 2), np.float32),
                MatchOptions(threshold=0.5),
                client=no_gpu,
            )
    assert "\n" not in str(error.value)


# -- estimate, max_pairs, groups, options -----------------------------------------------------


def planted(rng, n, m, dim, count):
    a, b = unit(rng, n, dim), unit(rng, m, dim)
    rows_a = rng.choice(n, count, replace=False)
    b[rng.choice(m, count, replace=False)] = a[rows_a]
    return a, b


def test_estimate_pairs_close_to_truth():
    rng = np.random.default_rng(8)
    a, b = planted(rng, 3000, 2000, 64, 300)
    truth = len(reference(a, b, 0.9, None))
    assert 300 <= truth < 320
    estimate = estimate_pairs(a, b, 0.9, sample_rows=256)
    assert truth / 2 <= estimate <= truth * 2
    assert estimate_pairs(a, b, 0.9, sample_rows=5000) == truth  # the sample is all of A
    c = np.concatenate([a[:900], a[:100]])  # 100 duplicate pairs
    assert len(reference(c, c, 0.9, None, self_match=True)) == 100
    assert estimate_pairs(c, c, 0.9, self_match=True, sample_rows=5000) == 100
    assert 50 <= estimate_pairs(c, c, 0.9, self_match=True, sample_rows=256) <= 200


def test_max_pairs_stops_before_scoring(client):
    rng = np.random.default_rng(9)
    a, b = unit(rng, 400, 16), unit(rng, 300, 16)
    with pytest.raises(ImgsimError, match="max_pairs 100") as error:
        match_features(a, b, MatchOptions(threshold=0.0, max_pairs=100), client=client)
    assert "\n" not in str(error.value) and "top_k" in str(error.value)
    with pytest.raises(ImgsimError, match="4,000 pairs"):  # top-k alone: exactly n * k at most
        match_features(a, b, MatchOptions(top_k=10, max_pairs=3999), client=client)
    kept = match_features(a, b, MatchOptions(top_k=10, max_pairs=4000), client=client)
    assert len(kept) == 4000


def test_connected_groups():
    rows_a = np.array([0, 1, 5, 7, 3])
    rows_b = np.array([1, 4, 6, 8, 8])
    groups = connected_groups(rows_a, rows_b, 10)
    assert groups.tolist() == [0, 0, 2, 3, 0, 5, 5, 3, 3, 9]
    assert groups.dtype == np.int64
    assert connected_groups(np.array([], int), np.array([], int), 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("batch", [1, 7, 10**6])
def test_a_group_forest_fed_in_pieces_finds_the_groups_of_all_the_pairs(batch):
    """Pieces of a random graph (chains across pieces, repeated pairs, a row paired with
    itself): the groups of every row in a pair, as `connected_groups` finds them at once,
    while the forest never holds more edges than rows in pairs plus one batch."""
    rng = np.random.default_rng(3)
    rows_a = rng.integers(0, 400, 300)
    rows_b = rng.integers(0, 400, 300)
    rows_a[:40], rows_b[:40] = np.arange(40), np.arange(1, 41)  # a chain split across pieces
    rows_a, rows_b = np.append(rows_a, [7, 7, 500]), np.append(rows_b, [8, 8, 500])
    forest = GroupForest(batch=batch)
    cuts = np.sort(rng.choice(np.arange(1, len(rows_a)), 20, replace=False))
    for a, b in zip(np.split(rows_a, cuts), np.split(rows_b, cuts)):
        forest.add(a, b)
        assert len(forest._rows) < len(np.union1d(rows_a, rows_b))  # a forest, not the pairs
    groups = forest.groups()
    members = np.union1d(rows_a, rows_b)
    assert groups.index.tolist() == members.tolist()
    expected = connected_groups(rows_a, rows_b, 501)[members]
    assert groups.to_numpy().tolist() == expected.tolist()
    assert groups.loc[40] == 0 and groups.loc[500] == 500  # the chain's end; a self-pair alone
    assert GroupForest().groups().empty


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"threshold": 1.5}, r"threshold 1.5 is outside \[-1, 1\]"),
        ({"threshold": -1.01}, "outside"),
        ({"top_k": 0}, "top_k must be an integer of at least 1"),
        ({"top_k": 2.5}, "top_k"),
        ({"threshold": 0.5, "block_rows": 0}, "block_rows"),
        ({"threshold": 0.5, "slice_rows": -3}, "slice_rows"),
        ({"threshold": 0.5, "max_pairs": -1}, "max_pairs"),
        ({"threshold": 0.5, "scorer": "cupy"}, "unknown scorer 'cupy'; choose one of: auto, numpy"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(InputError, match=message) as error:
        MatchOptions(**kwargs)
    assert "\n" not in str(error.value)


def test_bad_inputs():
    a, b = np.ones((3, 4), np.float32), np.ones((2, 5), np.float32)
    cases = [
        (lambda: match_features(a, a, MatchOptions()), "threshold .*top-k"),
        (
            lambda: match_features(a, b, MatchOptions(threshold=0.5)),
            "feature dims differ: A has 4, B has 5",
        ),
        (
            lambda: match_features(a, a[:2], MatchOptions(threshold=0.5), self_match=True),
            "one source",
        ),
        (lambda: match_features(a[0], a, MatchOptions(threshold=0.5)), "2-d array"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
