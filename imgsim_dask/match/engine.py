"""Engine: run the kernel over all of A and B, in this process or on the cluster's `GPU`
workers, and estimate a run's pair count before it starts.

The n x m similarity matrix never exists. On a cluster the driver reads B slice by slice
and scatters the slices to the workers tagged `GPU`, where an aligned copy stays resident
for the whole run; then it streams blocks of A through a bounded window of `score-NNNNN`
tasks (`pipeline.bounded`) and collects their pairs as they complete. `client=None` runs
the same kernel in-process, block after block.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client, Future, span

from ..cluster import GPU, require_workers
from ..errors import InputError
from ..options import TASK_RETRIES, MatchOptions, OptionError, opt
from ..pipeline import bounded
from .device import release_device_slices
from .kernel import (
    Pairs,
    as_float32,
    concat_pairs,
    dedupe,
    no_pairs,
    score_block,
    score_rows,
    valid_rows,
)

logger = logging.getLogger(__name__)

ESTIMATE_SAMPLE_ROWS = 256


def match_features(
    a: Any,
    b: Any,
    options: MatchOptions | None = None,
    *,
    client: Client | None = None,
    self_match: bool = False,
) -> pd.DataFrame:
    """Pairs of rows of `a` and `b` as a DataFrame `row_a`, `row_b`, `similarity`.

    `a` and `b` are rows x dim arrays readable on the driver (zarr arrays, numpy arrays);
    `self_match=True` matches `a` against itself (`b` may be None or `a`). With a
    `distributed.Client`, blocks are scored on its `GPU` workers; with `client=None` the same
    kernel runs here, block after block (fine for small jobs).
    """
    options = options or MatchOptions()
    if options.threshold is None and options.top_k is None:
        raise OptionError(
            f"give a threshold ({opt('threshold')}), a top-k ({opt('top_k')}), or both"
        )
    if self_match and b is None:
        b = a
    n, m, _ = check_shapes(a, b, self_match)
    if options.top_k is not None:  # k past B's size buys nothing but memory
        options = replace(options, top_k=min(options.top_k, max(1, m - self_match)))
    if options.max_pairs is not None:
        expected = _expected_pairs(a, b, options, self_match)
        if expected > options.max_pairs:
            raise OptionError(
                f"about {expected:,} pairs expected, more than {opt('max_pairs')} "
                f"{options.max_pairs:,}: raise {opt('threshold')}"
                f"{'' if options.top_k else ' or use ' + opt('top_k')} (or raise "
                f"{opt('max_pairs')})"
            )
    if n == 0 or m == 0:
        return pairs_frame(*no_pairs())
    if client is None:
        pairs = _match_here(a, b, options, self_match, n, m)
    else:
        pairs = _match_on_cluster(client, a, b, options, self_match, n, m)
    if self_match and options.top_k is not None:
        pairs = dedupe(*pairs)
    return pairs_frame(*pairs)


def check_shapes(a: Any, b: Any, self_match: bool = False) -> tuple[int, int, int]:
    """`(n, m, dim)` of two feature arrays, or a one-line InputError."""
    for name, x in (("A", a), ("B", b)):
        if len(getattr(x, "shape", ())) != 2:
            raise InputError(
                f"features {name} must be a 2-d array (rows x dim), "
                f"got shape {getattr(x, 'shape', None)}"
            )
    (n, dim_a), (m, dim_b) = a.shape, b.shape
    if dim_a != dim_b:
        raise InputError(
            f"feature dims differ: A has {dim_a}, B has {dim_b}; "
            f"extract both sources with the same model"
        )
    if self_match and n != m:
        raise InputError(f"a self match needs one source, got {n} and {m} rows")
    return int(n), int(m), int(dim_a)


def pairs_frame(rows_a: np.ndarray, rows_b: np.ndarray, sims: np.ndarray) -> pd.DataFrame:
    """The pairs table, sorted by row_a, then similarity descending, then row_b."""
    order = np.lexsort((rows_b, -sims, rows_a))
    return pd.DataFrame(
        {
            "row_a": rows_a[order].astype(np.int64, copy=False),
            "row_b": rows_b[order].astype(np.int64, copy=False),
            "similarity": sims[order].astype(np.float32, copy=False),
        }
    )


def _slice_starts(m: int, slice_rows: int) -> list[int]:
    return list(range(0, m, slice_rows))


def _read(x: Any, start: int, stop: int) -> np.ndarray:
    return as_float32(x[start:stop])


def _match_here(a: Any, b: Any, options: MatchOptions, self_match: bool, n: int, m: int) -> Pairs:
    starts = _slice_starts(m, options.slice_rows)
    slices = [_read(b, s, min(s + options.slice_rows, m)) for s in starts]
    valids = [valid_rows(s) for s in slices]
    run = uuid.uuid4().hex[:8]
    parts = []
    try:
        for start in range(0, n, options.block_rows):
            block = _read(a, start, min(start + options.block_rows, n))
            parts.append(
                score_block(
                    block,
                    start,
                    slices,
                    starts,
                    options.threshold,
                    options.top_k,
                    self_match,
                    b_valid=valids,
                    threads=options.threads,
                    scorer=options.scorer,
                    device_run=run,
                )
            )
    finally:
        release_device_slices(run)
    return concat_pairs(parts)


def _match_on_cluster(
    client: Client, a: Any, b: Any, options: MatchOptions, self_match: bool, n: int, m: int
) -> Pairs:
    gpu_workers = require_workers(client, fetch=False, stage="score")
    run = uuid.uuid4().hex[:8]
    starts = _slice_starts(m, options.slice_rows)
    slice_futures, valid_futures = [], []
    for j, start in enumerate(starts):  # one slice in driver memory at a time
        raw_key = f"bslice-raw-{j:05d}-{run}"
        raw = client.scatter(
            {raw_key: _read(b, start, min(start + options.slice_rows, m))},
            workers=gpu_workers,
            hash=False,
        )[raw_key]
        # An aligned copy made on the worker becomes the resident slice (scattered arrays
        # land misaligned); the scattered original is released once it is copied.
        resident = client.submit(
            as_float32, raw, key=f"bslice-{j:05d}-{run}", resources={GPU: 1}, pure=False
        )
        slice_futures.append(resident)
        valid_futures.append(
            client.submit(
                valid_rows, resident, key=f"bvalid-{j:05d}-{run}", resources={GPU: 1}, pure=False
            )
        )
        del raw
    logger.debug("B resident on the GPU workers in %d slices", len(starts))

    blocks: dict[int, Future] = {}  # A blocks scattered for score tasks still running

    def submit(start: int) -> Future:
        block = _read(a, start, min(start + options.block_rows, n))
        i = start // options.block_rows
        block_key = f"ablock-{i:05d}-{run}"
        blocks[start] = client.scatter({block_key: block}, workers=gpu_workers, hash=False)[
            block_key
        ]
        with span("match", "score"):
            return client.submit(
                score_block,
                blocks[start],
                start,
                slice_futures,
                starts,
                options.threshold,
                options.top_k,
                self_match,
                b_valid=valid_futures,
                threads=options.threads,
                scorer=options.scorer,
                device_run=run,
                key=f"score-{i:05d}-{run}",
                resources={GPU: 1},
                retries=TASK_RETRIES,
                pure=False,
            )

    parts: list[Pairs] = []
    try:
        with bounded(
            client, range(0, n, options.block_rows), submit, 2 * len(gpu_workers) + 1
        ) as scored:
            for start, future in scored:
                parts.append(future.result())
                del blocks[start]  # releases the A block on the worker
                if self_match and options.top_k is not None and len(parts) > 16:
                    parts = [dedupe(*concat_pairs(parts))]
    finally:  # on an error, stop what is still queued; in any case free B on the workers
        client.cancel([*blocks.values(), *slice_futures, *valid_futures])
        # every worker: one that joined during the run may have scored (and copied B) too
        client.run(release_device_slices, run, on_error="ignore")
    return concat_pairs(parts)


def estimate_pairs(
    a: Any,
    b: Any,
    threshold: float,
    self_match: bool = False,
    sample_rows: int | None = None,
    *,
    slice_rows: int = 4096,
    threads: int | None = None,
    seed: int = 0,
) -> int:
    """Estimated pair count at `threshold`: a random sample of A's rows against all of B, scaled.

    The sample (default: 256 rows, or 1% of A when that is more) costs `sample_rows x m`
    similarities, computed here on the driver with B read slice by slice: at most a few
    percent of the run it guards. Exact when the sample covers A; rare pairs (a few
    hundred planted duplicates) come out within a factor of about 2.
    """
    if self_match and b is None:
        b = a
    n, m, _ = check_shapes(a, b, self_match)
    if n == 0 or m == 0:
        return 0
    size = min(int(sample_rows or max(ESTIMATE_SAMPLE_ROWS, n // 100)), n)
    picked = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    rows = _take(a, picked)
    count = 0
    for start in _slice_starts(m, slice_rows):
        b_slice = _read(b, start, min(start + slice_rows, m))
        # self: count both orientations (without the diagonal) and halve below
        found = score_rows(
            rows, picked.astype(np.int64), [b_slice], [start], None, threshold, None, False, threads
        )
        count += len(found[0]) - (int(np.count_nonzero(found[0] == found[1])) if self_match else 0)
    total = count * n / size
    return int(round(total / 2 if self_match else total))


def _expected_pairs(a: Any, b: Any, options: MatchOptions, self_match: bool) -> int:
    n = int(a.shape[0])
    bound = None if options.top_k is None else n * options.top_k
    if options.threshold is None:
        assert bound is not None  # MatchOptions has a threshold, a top-k or both
        return bound
    estimate = estimate_pairs(
        a, b, options.threshold, self_match, slice_rows=options.slice_rows, threads=options.threads
    )
    return estimate if bound is None else min(bound, estimate)


def _take(x: Any, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted) of an array-like: numpy fancy indexing or zarr's orthogonal one."""
    if isinstance(x, np.ndarray):
        return as_float32(x[rows])
    if hasattr(x, "oindex"):
        return as_float32(x.oindex[rows, :])
    return as_float32(np.stack([np.asarray(x[int(i)]) for i in rows]))
