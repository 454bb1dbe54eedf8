"""The matching engine's semantics spelled out densely, and data whose dot products are exact.

test_match.py checks the engine against these; test_accel.py's JAX subprocess does too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgsim_dask.match import engine, kernel, score_block, valid_rows


def reference(
    a: np.ndarray,
    b: np.ndarray,
    threshold: float | None,
    top_k: int | None,
    self_match: bool = False,
) -> pd.DataFrame:
    """The module's semantics, spelled out on the dense matrix."""
    sims = np.clip(a.astype(np.float32) @ b.astype(np.float32).T, -1, 1)
    sims[~valid_rows(a)] = -np.inf
    sims[:, ~valid_rows(b)] = -np.inf
    if self_match:
        np.fill_diagonal(sims, -np.inf)
    found: dict[tuple[int, int], float] = {}
    for i in range(len(a)):
        if top_k is None:
            chosen = np.flatnonzero(sims[i] >= np.float32(threshold))
        else:
            chosen = np.lexsort((np.arange(len(b)), -sims[i]))[:top_k]
            chosen = [j for j in chosen if sims[i, j] > -np.inf]
            if threshold is not None:
                chosen = [j for j in chosen if sims[i, j] >= np.float32(threshold)]
        for j in chosen:
            if self_match and top_k is None and j <= i:
                continue
            pair = (min(i, j), max(i, j)) if self_match else (i, j)
            found[pair] = max(found.get(pair, -np.inf), sims[i, j])
    rows = np.array(list(found), dtype=np.int64).reshape(-1, 2)
    return engine.pairs_frame(rows[:, 0], rows[:, 1], np.array(list(found.values()), np.float32))


def assert_same(got: pd.DataFrame, expected: pd.DataFrame, exact: bool = True) -> None:
    assert list(got.columns) == ["row_a", "row_b", "similarity"]
    assert got.dtypes.tolist() == [np.int64, np.int64, np.float32]
    if exact:
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    else:
        assert set(zip(got.row_a, got.row_b)) == set(zip(expected.row_a, expected.row_b))
        merged = got.merge(expected, on=["row_a", "row_b"])
        np.testing.assert_allclose(merged.similarity_x, merged.similarity_y, atol=1e-5)


def quantized(rng: np.random.Generator, rows: int, dim: int = 8) -> np.ndarray:
    """Rows of multiples of 1/8 (dot products exact in float32), with duplicate rows."""
    x = (rng.integers(-2, 3, (rows, dim)) / 8).astype(np.float32)
    if rows > 3:
        x[rng.integers(0, rows, rows // 4)] = x[rng.integers(0, rows)]  # duplicates: ties
    return x


def exact_units(rng: np.random.Generator, rows: int, dim: int = 8) -> np.ndarray:
    """Unit rows of four entries +-1/2 (dot products exact in float32, and importing, which
    normalises, leaves them as they are), with repeated rows: ties."""
    x = np.zeros((rows, dim), dtype=np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    x[rng.integers(0, rows, rows // 4)] = x[rng.integers(0, rows)]
    return x


MODES = [(0.25, None), (None, 3), (0.1, 4), (-1.0, None), (None, 1)]


def score_blocks(a, b, options, self_match, scorer="numpy"):
    """Run score_block the way the driver does, in-process."""
    starts = list(range(0, len(b), options.slice_rows))
    slices = [b[s : s + options.slice_rows] for s in starts]
    parts = [
        score_block(
            a[s : s + options.block_rows],
            s,
            slices,
            starts,
            options.threshold,
            options.top_k,
            self_match,
            threads=options.threads,
            scorer=scorer,
        )
        for s in range(0, len(a), options.block_rows)
    ]
    pairs = kernel.concat_pairs(parts)
    if self_match and options.top_k is not None:
        pairs = kernel.dedupe(*pairs)
    return engine.pairs_frame(*pairs)
