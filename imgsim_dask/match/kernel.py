"""Kernel: score a block of A against B's slices inside one task and keep only the pairs
that matter; the same semantics on the CPU (numpy sgemms on threads) and on a device
(`device`).

Each task splits its block's rows over a few threads; each thread computes one sgemm per B
slice into a reused buffer and keeps either every pair at or above the threshold or each
row's top k (a running merge), so only pairs leave the task. Memory per task is about
`block_rows x slice_rows x 5` bytes (similarities + a mask) besides B, whatever n and m are.

Semantics, fixed here once:

- Rows that are not finite or are all zero (failed rows are stored all-NaN) never match.
- Similarities are float32 dot products (cosine for L2-normalised rows), clipped to [-1, 1]
  before anything is compared (float32 rounding takes identical rows a few 1e-7 past 1);
  the threshold is compared in float32 (`sim >= float32(threshold)`), so `threshold=-1`
  keeps every pair. Identical rows can score a few 1e-7 below 1: find exact copies by the
  row table's `sha256`, not by a threshold of 1.
- Threshold mode: every pair with `sim >= threshold`.
- Top-k mode: for each A row, its k best B rows ordered by similarity descending, then row
  of B ascending (so ties are broken by the smaller row id, deterministically). With a
  threshold too, those of the k that fall below it are dropped.
- Self match (A is B): a row never matches itself and each unordered pair appears once, as
  `row_a < row_b`. Threshold mode: every pair `i < j` with `sim >= threshold`. Top-k mode:
  each row takes its k best neighbours other than itself (ties as above, then the threshold
  filter), and the pair set is the union of those choices, so a pair is kept when either row
  chose the other; its similarity is the larger of the (at most two, equal up to float32
  rounding) computed values.
- Output order: `row_a` ascending, then similarity descending, then `row_b` ascending.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import InputError
from .device import device_copies, resolve_scorer, threshold_candidates, top_k_candidates

MIN_ROWS_PER_THREAD = 64  # below this, splitting a block over threads costs more than it gives
_PARTITION_ROWS = 256  # rows per np.partition call in the top-k kernel (bounds its temporary)
_ROW_GROUP = 32  # rows per top-k merge step: its temporaries take ~60 bytes per candidate
_LOWEST = np.float32(-np.finfo(np.float32).max)  # below every real similarity, above -inf

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def valid_rows(x: np.ndarray) -> np.ndarray:
    """True for rows that can match: all finite and not all zero."""
    if x.shape[1] == 0:
        return np.zeros(len(x), dtype=bool)
    norms = np.einsum("ij,ij->i", x, x)  # NaN or inf anywhere in a row makes its norm non-finite
    return np.isfinite(norms) & (norms > 0)


def score_block(
    a_block: np.ndarray,
    a_start: int,
    b_slices: Sequence[np.ndarray],
    b_starts: Sequence[int],
    threshold: float | None,
    top_k: int | None,
    self_match: bool,
    *,
    b_valid: Sequence[np.ndarray] | None = None,
    threads: int | None = None,
    scorer: str = "auto",
    device_run: str | None = None,
    slice_numbers: Sequence[int] | None = None,
    directed: bool = False,
) -> Pairs:
    """Pairs of A rows `a_start ...` against every B slice: `(rows_a, rows_b, similarity)`.

    `b_slices[j]` holds the B rows starting at `b_starts[j]` (ascending, contiguous, the same
    for every block); `b_valid[j]` their `valid_rows` mask (computed here when not given).
    `scorer` is resolved here (`device.resolve_scorer`); on a device, the copies of B's
    slices are kept for the next blocks of run `device_run` (without one, for this call), by
    their `slice_numbers` in B (default: their places in `b_slices`).
    Pairs follow the module's semantics; in self top-k mode they are already canonical
    (`row_a < row_b`) but a pair chosen from two blocks appears in both blocks' results.
    `directed=True` leaves self top-k pairs as chosen, `row_a` the choosing row, for a merge
    with the same rows' choices among other slices (`merge_top_k`).
    """
    a = as_float32(a_block)
    ids = np.arange(a_start, a_start + len(a), dtype=np.int64)
    return score_rows(
        a,
        ids,
        b_slices,
        b_starts,
        b_valid,
        threshold,
        top_k,
        self_match,
        threads,
        resolve_scorer(scorer),
        device_run,
        slice_numbers,
        directed,
    )


def score_rows(
    a: np.ndarray,
    ids: np.ndarray,
    b_slices: Sequence[np.ndarray],
    b_starts: Sequence[int],
    b_valid: Sequence[np.ndarray] | None,
    threshold: float | None,
    top_k: int | None,
    self_match: bool,
    threads: int | None,
    scorer: str = "numpy",
    device_run: str | None = None,
    slice_numbers: Sequence[int] | None = None,
    directed: bool = False,
) -> Pairs:
    """`score_block` for A rows with global ids `ids` (ascending, not necessarily contiguous)."""
    if threshold is None and top_k is None:
        raise InputError("give a threshold, a top-k, or both")
    slices = [_checked_2d(s) for s in b_slices]  # made float32/aligned one at a time, below
    starts = [int(s) for s in b_starts]
    valids = list(b_valid) if b_valid is not None else [valid_rows(s) for s in slices]
    keep = valid_rows(a)
    if not keep.all():
        a, ids = a[keep], ids[keep]
    nonempty = [j for j, s in enumerate(slices) if len(s)]
    slices = [slices[j] for j in nonempty]
    starts = [starts[j] for j in nonempty]
    valids = [np.asarray(valids[j], dtype=bool) for j in nonempty]
    if not len(a) or not slices:
        return no_pairs()
    if top_k is not None:  # a row cannot have more neighbours than B has rows
        top_k = min(top_k, sum(len(s) for s in slices))
    numbers = [int(slice_numbers[j]) if slice_numbers is not None else j for j in nonempty]
    if scorer == "keras":
        pairs = _score_on_device(
            a, ids, slices, starts, valids, threshold, top_k, self_match, device_run, numbers
        )
    else:
        pairs = _score_on_threads(
            a, ids, slices, starts, valids, threshold, top_k, self_match, threads
        )
    if self_match and top_k is not None and not directed:
        pairs = canonical(*pairs)
    return pairs


def canonical(rows_a: np.ndarray, rows_b: np.ndarray, sims: np.ndarray) -> Pairs:
    """Self-match pairs as `row_a < row_b`, each once (the larger similarity)."""
    return dedupe(np.minimum(rows_a, rows_b), np.maximum(rows_a, rows_b), sims)


def merge_top_k(parts: Sequence[Pairs], k: int) -> Pairs:
    """Each A row's k best of the pairs of `parts` (each row's choices among some of B's
    slices): similarity descending, then row of B ascending, as if scored in one pass."""
    rows_a, rows_b, sims = concat_pairs(parts)
    order = np.lexsort((rows_b, -sims, rows_a))
    rows_a, rows_b, sims = rows_a[order], rows_b[order], sims[order]
    rank = np.arange(len(rows_a)) - np.searchsorted(rows_a, rows_a, side="left")
    take = rank < k
    return rows_a[take], rows_b[take], sims[take]


def _score_on_threads(
    a: np.ndarray,
    ids: np.ndarray,
    slices: list[np.ndarray],
    starts: list[int],
    valids: list[np.ndarray],
    threshold: float | None,
    top_k: int | None,
    self_match: bool,
    threads: int | None,
) -> Pairs:
    """The CPU kernel: A's rows split over threads, each running its own sgemms."""
    n_threads = max(1, min(threads or available_cpus(), len(a) // MIN_ROWS_PER_THREAD))
    bounds = np.linspace(0, len(a), n_threads + 1).astype(int)

    def run(t: int) -> Pairs:
        rows = slice(bounds[t], bounds[t + 1])
        if top_k is None:
            return _threshold_rows(
                a[rows], ids[rows], slices, starts, valids, threshold, self_match, False
            )
        return _top_k_rows(a[rows], ids[rows], slices, starts, valids, top_k, threshold, self_match)

    if n_threads == 1:
        return run(0)
    with ThreadPoolExecutor(n_threads, thread_name_prefix="score") as pool:
        return concat_pairs(list(pool.map(run, range(n_threads))))


def _score_on_device(
    a: np.ndarray,
    ids: np.ndarray,
    slices: list[np.ndarray],
    starts: list[int],
    valids: list[np.ndarray],
    threshold: float | None,
    top_k: int | None,
    self_match: bool,
    run: str | None,
    slice_numbers: list[int],
) -> Pairs:
    """The device kernel (`device`): the whole block at once, B from its device copies."""
    on_device = device_copies(slices, run, slice_numbers)
    if top_k is None:
        return _threshold_rows(a, ids, on_device, starts, valids, threshold, self_match, True)
    return _top_k_rows_on_device(a, ids, on_device, starts, valids, top_k, threshold, self_match)


def _threshold_rows(
    a: np.ndarray,
    ids: np.ndarray,
    slices: list,
    starts: list[int],
    valids: list[np.ndarray],
    threshold: float | None,
    self_match: bool,
    on_device: bool,
) -> Pairs:
    """Every pair with sim >= threshold (self: only ids[i] < row_b), one sgemm per slice."""
    assert threshold is not None, "threshold mode needs a threshold"
    # clip(sim) >= threshold is sim >= threshold above -1 and always true at -1: no pass
    # over the whole matrix to clip it, only the pairs kept are clipped
    limit = float(np.float32(threshold)) if threshold > -1 else -np.inf
    first_id, last_id = int(ids[0]), int(ids[-1])
    # self: only columns after the block's first row can pair with it
    skips = [max(0, first_id + 1 - start) if self_match else 0 for start in starts]
    found = (
        threshold_candidates(a, slices, limit, skips)
        if on_device
        else _threshold_candidates(a, slices, limit, skips)
    )
    out: list[Pairs] = []
    for j, r, c, values in found:
        start, valid = starts[j], valids[j]
        keep = None if valid.all() else valid[c]
        rows_b = c + start
        if self_match and start <= last_id:  # the block's own triangle
            above = rows_b > ids[r]
            keep = above if keep is None else keep & above
        values = np.clip(values, -1, 1)
        rows_a = ids[r]
        if keep is not None:
            rows_a, rows_b, values = rows_a[keep], rows_b[keep], values[keep]
        out.append((rows_a, rows_b, values))
    return concat_pairs(out)


def _threshold_candidates(
    a: np.ndarray, slices: list[np.ndarray], limit: float, skips: list[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """`device.threshold_candidates` on the CPU: one sgemm per slice into a reused buffer,
    without the first `skips[j]` columns of slice j."""
    width = max(len(s) for s in slices)
    sims_buffer = np.empty(len(a) * width, dtype=np.float32)
    hits_buffer = np.empty(len(a) * width, dtype=bool)
    for j, (b, skip) in enumerate(zip(slices, skips)):
        if skip >= len(b):
            continue
        b = as_float32(b)
        cols = len(b) - skip
        sims = sims_buffer[: len(a) * cols].reshape(len(a), cols)
        np.matmul(a, b[skip:].T, out=sims)
        hits = hits_buffer[: sims.size]
        np.greater_equal(sims.reshape(-1), limit, out=hits)
        flat = np.flatnonzero(hits)
        if flat.size:
            r, c = np.divmod(flat, cols)
            yield j, r, c + skip, sims.reshape(-1)[flat]


def _top_k_rows(
    a: np.ndarray,
    ids: np.ndarray,
    slices: list[np.ndarray],
    starts: list[int],
    valids: list[np.ndarray],
    k: int,
    threshold: float | None,
    self_match: bool,
) -> Pairs:
    """Each row's k best (sim desc, row_b asc) over all slices, by a running merge.

    `best_sims`/`best_ids` hold each row's best so far, sorted; once a row holds k, a new
    column can only enter with a similarity strictly above its k-th (an equal one has a larger
    row id, since slices come in ascending order), so most columns are rejected by a compare.
    """
    n = len(a)
    best_sims = np.full((n, k), -np.inf, dtype=np.float32)
    best_ids = np.full((n, k), -1, dtype=np.int64)
    width = max(len(s) for s in slices)
    sims_buffer = np.empty(n * width, dtype=np.float32)
    hits_buffer = np.empty(n * width, dtype=bool)
    row_index = np.arange(n)
    for b, start, valid in zip(slices, starts, valids):
        b = as_float32(b)
        cols = len(b)
        sims = sims_buffer[: n * cols].reshape(n, cols)
        np.matmul(a, b.T, out=sims)
        np.clip(sims, -1, 1, out=sims)
        if not valid.all():
            sims[:, ~valid] = -np.inf
        if self_match:
            own = ids - start
            inside = (own >= 0) & (own < cols)
            sims[row_index[inside], own[inside]] = -np.inf

        bound = best_sims[:, k - 1].copy()
        strict = bound > -np.inf  # rows already holding k
        if not strict.all():
            # Rows still short of k: only the slice's own k best (with ties) can enter.
            short = np.flatnonzero(~strict)
            if cols >= k:
                for lo in range(0, len(short), _PARTITION_ROWS):
                    part = sims[short[lo : lo + _PARTITION_ROWS]]
                    part.partition(cols - k, axis=1)
                    bound[short[lo : lo + _PARTITION_ROWS]] = part[:, cols - k]
        bound = np.maximum(bound, _LOWEST)  # never take -inf (invalid, itself)
        cutoff = np.where(strict, np.nextafter(bound, np.float32(np.inf)), bound)
        for lo in range(0, n, _ROW_GROUP):  # groups bound the temporaries when many columns tie
            rows = slice(lo, lo + _ROW_GROUP)
            _merge_slice(
                sims[rows],
                cutoff[rows],
                bound[rows],
                best_sims[rows],
                best_ids[rows],
                start,
                hits_buffer,
            )

    return _best_pairs(best_sims, best_ids, ids, threshold)


def _top_k_rows_on_device(
    a: np.ndarray,
    ids: np.ndarray,
    slices: list,
    starts: list[int],
    valids: list[np.ndarray],
    k: int,
    threshold: float | None,
    self_match: bool,
) -> Pairs:
    """`_top_k_rows` with each slice's k best per row chosen on the device, merged here."""
    best_sims = np.full((len(a), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(a), k), -1, dtype=np.int64)
    found = top_k_candidates(a, ids, slices, starts, valids, k, self_match)
    for start, (values, cols) in zip(starts, found):
        r, c = np.nonzero(values > -np.inf)  # -inf: invalid columns, the row itself
        _merge_candidates(best_sims, best_ids, r, cols[r, c] + start, values[r, c])
    return _best_pairs(best_sims, best_ids, ids, threshold)


def _best_pairs(
    best_sims: np.ndarray,
    best_ids: np.ndarray,
    ids: np.ndarray,
    threshold: float | None,
) -> Pairs:
    """The pairs of each row's k best (those >= threshold, if given), `row_a` the row."""
    keep = best_ids >= 0
    if threshold is not None:
        keep &= best_sims >= np.float32(threshold)
    r, c = np.nonzero(keep)
    return ids[r], best_ids[r, c], best_sims[r, c]


def _merge_slice(
    sims: np.ndarray,
    cutoff: np.ndarray,
    bound: np.ndarray,
    best_sims: np.ndarray,
    best_ids: np.ndarray,
    start: int,
    hits_buffer: np.ndarray,
) -> None:
    """Merge the columns of one slice at or above each row's `cutoff` into its k best, in place.

    A row takes at most k of the columns tied at its `bound` (the first k, by column).
    """
    n, cols = sims.shape
    k = best_sims.shape[1]
    hits = hits_buffer[: sims.size].reshape(n, cols)
    np.greater_equal(sims, cutoff[:, None], out=hits)
    flat = np.flatnonzero(hits)
    if not flat.size:
        return
    r, c = np.divmod(flat, cols)
    values = sims.reshape(-1)[flat]
    tie = values == bound[r]
    if tie.any():
        seen = np.cumsum(tie)
        before = seen - tie
        first = np.searchsorted(r, r, side="left")
        rank = before - before[first]
        keep = ~tie | (rank < k)
        r, c, values = r[keep], c[keep], values[keep]
    _merge_candidates(best_sims, best_ids, r, c.astype(np.int64) + start, values)


def _merge_candidates(
    best_sims: np.ndarray,
    best_ids: np.ndarray,
    r: np.ndarray,
    rows_b: np.ndarray,
    values: np.ndarray,
) -> None:
    """Merge candidates (row r of the group, B row, similarity) into each row's k best, in
    place: similarity descending, then B row ascending."""
    k = best_sims.shape[1]
    held_r, held_c = np.nonzero(best_ids >= 0)
    all_r = np.concatenate([held_r, r])
    all_sims = np.concatenate([best_sims[held_r, held_c], values])
    all_ids = np.concatenate([best_ids[held_r, held_c], rows_b])
    order = np.lexsort((all_ids, -all_sims, all_r))
    all_r, all_sims, all_ids = all_r[order], all_sims[order], all_ids[order]
    rank = np.arange(len(all_r)) - np.searchsorted(all_r, all_r, side="left")
    take = rank < k
    best_sims[all_r[take], rank[take]] = all_sims[take]
    best_ids[all_r[take], rank[take]] = all_ids[take]


def dedupe(rows_a: np.ndarray, rows_b: np.ndarray, sims: np.ndarray) -> Pairs:
    """One row per (row_a, row_b): the one with the largest similarity."""
    if not len(rows_a):
        return rows_a, rows_b, sims
    order = np.lexsort((-sims, rows_b, rows_a))
    rows_a, rows_b, sims = rows_a[order], rows_b[order], sims[order]
    first = np.ones(len(rows_a), dtype=bool)
    first[1:] = (rows_a[1:] != rows_a[:-1]) | (rows_b[1:] != rows_b[:-1])
    return rows_a[first], rows_b[first], sims[first]


def no_pairs() -> Pairs:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)


def concat_pairs(parts: Sequence[Pairs]) -> Pairs:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return no_pairs()
    return (
        np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False),
        np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False),
        np.concatenate([p[2] for p in parts]).astype(np.float32, copy=False),
    )


def _checked_2d(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"features must be a 2-d array (rows x dim), got shape {x.shape}")
    return x


def as_float32(x: Any) -> np.ndarray:
    """`x` as a C-contiguous, aligned float32 array, copied only when it is not one already.

    Arrays that arrive over Dask's comms sit at arbitrary byte offsets in the receive buffer
    (float32 data at an odd address); numpy's matmul then takes a slow path, so copy them.
    """
    x = _checked_2d(x)
    if x.dtype != np.float32 or not (x.flags.c_contiguous and x.flags.aligned):
        x = np.array(x, dtype=np.float32, order="C")
    return x


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
