"""Engine: run the kernel over all of A and B, in this process or on the cluster's `GPU`
workers, and estimate a run's pair count before it starts.

The n x m similarity matrix never exists. On a cluster, B is cut into slices that the
`GPU` workers read themselves from the store (`bslice-NNNNN` tasks), spread over them so
that no worker holds all of B; each slice stays resident on its worker for the whole run.
Blocks of A (`ablock-NNNNN`) stream through a bounded window: each block is scored on every
worker against the slices it holds (`score-NNNNN-WW`, only pairs leave the task), then one
`pairs-NNNNN` task merges the block's pairs (top-k across all slices) and hands them to the
driver, or writes them where the caller asked (`finish`) and returns only counts.
`client=None` runs the same kernel in-process, block after block.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client, Future, span
from distributed.comm import get_address_host

from ..cluster import require_workers
from ..errors import InputError
from ..options import TASK_RETRIES, MatchOptions, OptionError, opt
from ..pipeline import bounded
from .device import release_device_slices
from .kernel import (
    Pairs,
    as_float32,
    available_cpus,
    canonical,
    concat_pairs,
    dedupe,
    merge_top_k,
    score_block,
    score_rows,
    valid_rows,
)

logger = logging.getLogger(__name__)

ESTIMATE_SAMPLE_ROWS = 256
BLOCKS_IN_FLIGHT = 3  # blocks of A being scored at once, each on every scoring worker

Finish = Callable[[int, Pairs], Any]  # (block number, its pairs) -> what the driver receives


def match_features(
    a: Any,
    b: Any,
    options: MatchOptions | None = None,
    *,
    client: Client | None = None,
    self_match: bool = False,
    max_held: int | None = None,
    too_many: str = "",
) -> pd.DataFrame:
    """Pairs of rows of `a` and `b` as a DataFrame `row_a`, `row_b`, `similarity`.

    `a` and `b` are rows x dim arrays: numpy or zarr arrays, read here, or arrays with a
    `read(start, stop)` method (`store.StoredFeatures`) that the workers read themselves.
    `self_match=True` matches `a` against itself (`b` may be None or `a`). With a
    `distributed.Client`, blocks are scored on its `GPU` workers; with `client=None` the same
    kernel runs here, block after block (fine for small jobs). More than `max_held` pairs
    stop the run with an OptionError ending in `too_many`, before this process runs short of
    memory.
    """
    options, b = prepared(a, b, options, self_match)
    parts: list[Pairs] = []
    held = 0
    for _, pairs in scored_blocks(a, b, options, client=client, self_match=self_match):
        parts.append(pairs)
        held += len(pairs[0])
        if max_held is not None and held > max_held:
            raise OptionError(f"more than {max_held:,} pairs, more than fit here{too_many}")
        if self_match and options.top_k is not None and len(parts) > 16:
            parts = [dedupe(*concat_pairs(parts))]
    pairs = concat_pairs(parts)
    if self_match and options.top_k is not None:  # a pair chosen from two blocks
        pairs = dedupe(*pairs)
    return pairs_frame(*pairs)


def prepared(
    a: Any, b: Any, options: MatchOptions | None, self_match: bool
) -> tuple[MatchOptions, Any]:
    """The options a run of `a` against `b` goes by, and `b` (`a` for a self match), once
    the inputs are checked: a top-k no larger than B, and a `max_pairs` the estimate keeps."""
    options = options or MatchOptions()
    if options.threshold is None and options.top_k is None:
        raise OptionError(
            f"give a threshold ({opt('threshold')}), a top-k ({opt('top_k')}), or both"
        )
    if self_match and b is None:
        b = a
    _, m, _ = check_shapes(a, b, self_match)
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
    return options, b


def scored_blocks(
    a: Any,
    b: Any,
    options: MatchOptions,
    *,
    client: Client | None,
    self_match: bool,
    finish: Finish | None = None,
    a_blocks: list[tuple[int, int]] | None = None,
    b_start: int = 0,
) -> Iterator[tuple[int, Any]]:
    """`(block number, result)` for every block of A, in completion order: the block's pairs
    against B's rows from `b_start` on (self top-k: canonical, but a pair chosen from two
    blocks comes from both), or what `finish(block, pairs)` returns, run where the block
    was merged (a worker on a cluster). The blocks are `a_blocks` (row ranges; default: all
    of A in blocks of `options.block_rows`). `options` as `prepared` made them."""
    n, m, _ = check_shapes(a, b, self_match)
    if a_blocks is None:
        a_blocks = [(s, min(s + options.block_rows, n)) for s in range(0, n, options.block_rows)]
    a_blocks = [(start, stop) for start, stop in a_blocks if stop > start]
    if not a_blocks or m <= b_start:
        return
    run = (a, b, options, self_match, a_blocks, range(b_start, m, options.slice_rows), m, finish)
    if client is None:
        yield from _scored_here(*run)
    else:
        yield from _scored_on_cluster(client, *run)


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


def _read(x: Any, start: int, stop: int) -> np.ndarray:
    return as_float32(x[start:stop])


def _scored_here(
    a: Any,
    b: Any,
    options: MatchOptions,
    self_match: bool,
    a_blocks: list[tuple[int, int]],
    starts: range,
    m: int,
    finish: Finish | None,
) -> Iterator[tuple[int, Any]]:
    slices = [_read(b, s, min(s + options.slice_rows, m)) for s in starts]
    valids = [valid_rows(s) for s in slices]
    run = uuid.uuid4().hex[:8]
    try:
        for i, (start, stop) in enumerate(a_blocks):
            block = _read(a, start, stop)
            pairs = score_block(
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
            yield i, pairs if finish is None else finish(i, pairs)
    finally:
        release_device_slices(run)


def _scored_on_cluster(
    client: Client,
    a: Any,
    b: Any,
    options: MatchOptions,
    self_match: bool,
    a_blocks: list[tuple[int, int]],
    starts: range,
    m: int,
    finish: Finish | None,
) -> Iterator[tuple[int, Any]]:
    workers = require_workers(client, fetch=False, stage="score")
    threads = _threads_per_worker(client, workers, options.threads)
    run = uuid.uuid4().hex[:8]
    stops = [min(start + options.slice_rows, m) for start in starts]
    # slice j lives on workers[j % W]: no worker holds more than its share of B
    held: dict[str, list[int]] = {
        w: list(range(k, len(starts), len(workers))) for k, w in enumerate(workers)
    }
    slices = [
        _rows_on(client, b, start, stop, f"bslice-{j:05d}-{run}", workers[j % len(workers)])
        for j, (start, stop) in enumerate(zip(starts, stops))
    ]
    valids = [
        client.submit(
            valid_rows,
            s,
            key=f"bvalid-{j:05d}-{run}",
            workers=[workers[j % len(workers)]],
            allow_other_workers=True,
            pure=False,
        )
        for j, s in enumerate(slices)
    ]
    logger.debug("B spread over %d scoring workers in %d slices", len(workers), len(starts))

    def submit(i: int) -> Future:
        start, stop = a_blocks[i]
        block = _rows_on(client, a, start, stop, f"ablock-{i:05d}-{run}", workers[i % len(workers)])
        scores = []
        with span("match", "score"):
            for w, (worker, mine) in enumerate(held.items()):
                if self_match and options.top_k is None:  # only slices past the block's start
                    mine = [j for j in mine if stops[j] > start + 1]
                if not mine:
                    continue
                scores.append(
                    client.submit(
                        score_block,
                        block,
                        start,
                        [slices[j] for j in mine],
                        [starts[j] for j in mine],
                        options.threshold,
                        options.top_k,
                        self_match,
                        b_valid=[valids[j] for j in mine],
                        threads=threads[worker],
                        scorer=options.scorer,
                        device_run=run,
                        slice_numbers=mine,
                        directed=True,
                        key=f"score-{i:05d}-{w:02d}-{run}",
                        workers=[worker],
                        allow_other_workers=True,
                        retries=TASK_RETRIES,
                        pure=False,
                    )
                )
            return client.submit(
                merge_block,
                i,
                scores,
                options.top_k,
                self_match,
                finish,
                key=f"pairs-{i:05d}-{run}",
                retries=TASK_RETRIES,
                pure=False,
            )

    try:
        with bounded(client, range(len(a_blocks)), submit, BLOCKS_IN_FLIGHT) as done:
            for i, future in done:
                yield i, future.result()
    finally:  # `bounded` cancelled the blocks in flight on an error; now free B
        # by releasing it, not cancelling: a cancel recurses into the score tasks, which no
        # client holds, and fails the scheduler's `assert ts.who_wants` (stimulus_cancel)
        slices.clear()
        valids.clear()
        # every worker: one that joined during the run may have scored (and copied B) too
        client.run(release_device_slices, run, on_error="ignore")


def _threads_per_worker(client: Client, workers: list[str], threads: int | None) -> dict:
    """Kernel threads of each scoring worker's tasks: `threads` if given, else its share of
    its host's CPUs (scoring workers on one host split them, rather than each taking all)."""
    if threads is not None:
        return dict.fromkeys(workers, threads)
    cpus = client.run(available_cpus, workers=workers)
    per_host = Counter(get_address_host(w) for w in workers)
    return {w: max(1, cpus[w] // per_host[get_address_host(w)]) for w in workers}


# The tasks pinned to a scoring worker carry no `resources`: with `allow_other_workers`,
# distributed places a task whose pinned worker is not running (paused, gone) on any worker,
# resources or not, and a worker without the resource then fails (`KeyError: 'GPU'` in its
# state machine). Pinned loosely, they run on their GPU worker, or anywhere if it is lost.


def _rows_on(client: Client, x: Any, start: int, stop: int, key: str, worker: str) -> Future:
    """A future of rows `start:stop` of `x` as an aligned float32 array, on `worker`: read
    there when `x` can be read on the workers (`read`), else read here and sent."""
    place = dict(workers=[worker], allow_other_workers=True, pure=False)
    read = getattr(x, "read", None)
    if read is not None:
        return client.submit(read, start, stop, key=key, **place)
    raw = client.scatter({f"{key}-raw": x[start:stop]}, workers=[worker], hash=False)
    # an aligned copy made on the worker is what the tasks use (scattered arrays land
    # misaligned); the scattered original is released once it is copied
    return client.submit(as_float32, raw[f"{key}-raw"], key=key, **place)


def merge_block(
    i: int, scores: list[Pairs], top_k: int | None, self_match: bool, finish: Finish | None
) -> Any:
    """Block `i`'s pairs from its score tasks (each against some of B's slices): every pair
    kept, or each row's top k over all slices; then `finish(i, pairs)` if given."""
    pairs = concat_pairs(scores) if top_k is None else merge_top_k(scores, top_k)
    if self_match and top_k is not None:
        pairs = canonical(*pairs)
    return pairs if finish is None else finish(i, pairs)


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
    for start in range(0, m, slice_rows):
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
