"""Driver: wire ingest -> fetch -> embed -> store on a Dask cluster, with back-pressure.

Per partition k the graph is `rows-k` (slice of the CSV blocks, fixed row ids) ->
`fetch-k` (CPU workers, resource `NET` when the cluster has it) -> `embed-k` (workers
with resource `GPU`). At most `window` partitions are in flight; the driver writes each
finished partition to the store as it arrives, so memory stays flat whatever the input size.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from distributed import Client, as_completed, span

from .cluster import GPU, NET, ClusterOptions, cluster_workers, connect, require_workers, workers_with
from .embed import ModelPlugin, embed_partition
from .errors import InputError, StoreError
from .fetch import OK, TRANSIENT_STATUSES, FetchOptions, fetch_partition
from .ingest import CsvSource, assemble_partition, inspect_csv, plan_partitions, read_blocks
from .models import Weights, get_spec, resolve_weights
from .runtime import check_runtime
from .store import DEFAULT_STORE, FeatureStore, StoreWriter, check_name

logger = logging.getLogger(__name__)

TASK_RETRIES = 2  # a task lost with its worker is recomputed elsewhere


@dataclass(frozen=True)
class ExtractOptions:
    """Everything that shapes an extraction besides its input and output."""

    model: str = "mobilenet"
    weights: str | None = None
    batch_size: int = 64
    runtime: str = "auto"
    partition_rows: int = 256
    fetch: FetchOptions = field(default_factory=FetchOptions)
    overwrite: bool = False
    resume: bool = False
    retry_failed: bool = False
    progress: bool = False


def extract(
    csv: str,
    name: str,
    store: str = DEFAULT_STORE,
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster_options: ClusterOptions | None = None,
    delimiter: str = ",",
    header: bool = True,
    cols: list[str] | None = None,
    url_col: str | None = None,
    id_col: str | None = None,
    options: ExtractOptions | None = None,
    **option_fields,
) -> FeatureStore:
    """Extract features for every row of `csv` into `store/name` and return the stored source.

    Runs on `client` if given, else on the scheduler at `scheduler` (or
    `DASK_SCHEDULER_ADDRESS`), else on an embedded local cluster; `cluster_options` adds
    TLS, a scheduler file and a performance report. Keyword arguments named
    like `ExtractOptions` fields (`model=`, `batch_size=`, ...) override `options`.
    """
    options = _merge_options(options, option_fields)
    check_name(name)
    source = inspect_csv(csv, delimiter, header, cols, url_col, id_col)
    spec = get_spec(options.model)
    if options.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    check_runtime(options.runtime)
    if options.overwrite and (options.resume or options.retry_failed):
        raise InputError("--overwrite excludes --resume and --retry-failed")
    if options.retry_failed:
        options = replace(options, resume=True)
    if (Path(store) / name).exists() and not (options.overwrite or options.resume):
        raise StoreError(f"source {name!r} already exists in {store}; pass --overwrite to "
                         "replace it (or --resume to continue an interrupted extraction)")
    weights = resolve_weights(options.model, options.weights)
    fetch_options = FetchOptions(**{**asdict(options.fetch), "image_size": spec.image_size,
                                    "base_dir": source.base_dir})
    with connect(scheduler, client, workers, cluster_options) as active:
        return _run(active, source, name, store, options, weights, fetch_options)


def _merge_options(options: ExtractOptions | None, overrides: dict) -> ExtractOptions:
    base = asdict(options or ExtractOptions())
    unknown = set(overrides) - set(base)
    if unknown:
        raise TypeError(f"unknown extract option(s): {', '.join(sorted(unknown))}")
    base.update(overrides)
    if isinstance(base["fetch"], dict):
        base["fetch"] = FetchOptions(**base["fetch"])
    return ExtractOptions(**base)


def _run(client: Client, source: CsvSource, name: str, store: str, options: ExtractOptions,
         weights: Weights, fetch_options: FetchOptions) -> FeatureStore:
    started = time.perf_counter()
    gpu_workers = require_workers(client, fetch=True, stage="embed")
    fetch_resources = {NET: 1} if workers_with(client, NET) else None

    blocks, block_lengths = read_blocks(source)
    n_rows = sum(block_lengths)
    if n_rows == 0:
        raise InputError(f"{source.path}: no data rows (only a header?)")
    plan = plan_partitions(block_lengths, options.partition_rows)
    spec = get_spec(options.model)

    writer = StoreWriter(store, name, _plan(source, options, weights, n_rows, spec.dim),
                         options.overwrite, options.resume)
    done_rows = writer.done_rows()
    retry: dict[int, list[int]] = {}  # partition -> its rows to fetch again
    if options.retry_failed or writer.retrying:  # (an interrupted retry goes on as one)
        failed = done_rows.loc[done_rows["status"].isin(TRANSIENT_STATUSES), "row"]
        for row in failed.astype(int):
            retry.setdefault(row // options.partition_rows, []).append(row)
        logger.info("%s: retrying %d row(s) with transient failures", name, len(failed))
        if retry:
            writer.reopen()
        done_rows = done_rows[~done_rows["row"].isin(failed)]
    if writer.complete:
        logger.info("%s: already complete in %s, nothing to do", name, store)
        return FeatureStore(writer.path)
    todo = [k for k in range(len(plan)) if k not in writer.done] + sorted(retry)
    if writer.done and len(writer.done) < len(plan):
        logger.info("%s: resuming, %d of %d partitions already written", name,
                    len(writer.done), len(plan))
    plugin = ModelPlugin(weights, options.runtime)
    client.register_plugin(plugin)

    token = uuid.uuid4().hex[:8]
    delayed_blocks = blocks.to_delayed()
    last_use = {block: k for k in todo for block, _, _ in plan[k]}
    block_futures: dict = {}

    def submit(k: int):
        slices = []
        for block, start, stop in plan[k]:
            if block not in block_futures:
                block_futures[block] = client.compute(delayed_blocks[block])
            slices.append((block_futures[block], start, stop))
            if last_use[block] == k:
                block_futures.pop(block)  # the rows task keeps it alive as long as needed
        first_row = k * options.partition_rows
        with span("extract", name, "rows"):  # spans group the stages on the dashboard
            rows = client.submit(assemble_partition, first_row, slices, list(source.keep),
                                 retry.get(k), key=f"rows-{k:05d}-{token}", retries=TASK_RETRIES)
        with span("extract", name, "fetch"):
            fetched = client.submit(fetch_partition, rows, source.url_col, fetch_options,
                                    key=f"fetch-{k:05d}-{token}", resources=fetch_resources,
                                    retries=TASK_RETRIES)
        size = len(retry[k]) if k in retry else sum(stop - start for _, start, stop in plan[k])
        fetched.add_done_callback(
            lambda f: fetch_bar.update(size) if f.status == "finished" else None)
        with span("extract", name, "embed"):
            return client.submit(embed_partition, fetched, plugin.name, options.batch_size,
                                 key=f"embed-{k:05d}-{token}", resources={GPU: 1},
                                 retries=TASK_RETRIES)

    window = 2 * len(gpu_workers) + _fetch_slots(client, fetch_resources) + 2
    pending: dict = {}  # embed key -> (future, partition)
    in_flight = as_completed()
    queue = iter(todo)

    def submit_next() -> None:
        k = next(queue, None)
        if k is not None:
            future = submit(k)
            pending[future.key] = (future, k)
            in_flight.add(future)

    counts: dict[str, int] = {}
    stage_seconds = {"fetch": 0.0, "embed": 0.0}
    runtimes: set[str] = set()  # what `auto` became on the model workers
    _count(counts, done_rows)
    fetch_bar = _progress_bar(options.progress, n_rows, f"fetch {name}", len(done_rows), 0)
    progress = _progress_bar(options.progress, n_rows, f"embed {name}", len(done_rows), 1)
    ok_before = counts.get(OK, 0)
    try:
        for _ in range(window):
            submit_next()
        for future in in_flight:
            embedded = future.result()
            k = pending.pop(future.key)[1]
            if k in retry:
                writer.rewrite_rows(k, embedded.features, embedded.rows)
            else:
                writer.write_partition(k, embedded.features, embedded.rows)
            _count(counts, embedded.rows)
            runtimes.add(embedded.runtime)
            for stage, value in embedded.seconds.items():
                stage_seconds[stage] += value
            progress.update(len(embedded.rows))
            progress.set_postfix(failed=_failed(counts), refresh=False)
            submit_next()
    except BaseException as exc:
        # stop the work still queued (on a shared cluster it would go on fetching). Cancel the
        # embed futures only: nothing depends on them, and the scheduler then releases their
        # fetch and rows tasks. Cancelling a CSV block future too made the scheduler recurse
        # into its dependents, rows tasks no client holds, and fail `assert ts.who_wants`
        # (Scheduler.stimulus_cancel): tracebacks, and this client's stream dropped. The
        # blocks are only released.
        client.cancel([future for future, _ in pending.values()])
        for block_future in block_futures.values():
            block_future.release()
        if isinstance(exc, KeyboardInterrupt):
            done = "while retrying failed rows" if retry else \
                f"with {len(writer.done)} of {len(plan)} partitions written"
            logger.warning("%s: interrupted %s; continue with --resume", name, done)
        raise
    finally:
        fetch_bar.close()
        progress.close()

    seconds = time.perf_counter() - started
    meta = {
        "name": name,
        "model": options.model,
        "dim": spec.dim,
        "threshold": spec.threshold,
        "weights": weights.source,
        "weights_sha256": weights.sha256,
        "csv": source.path if "://" in source.path else str(Path(source.path).resolve()),
        "fields": list(source.keep),
        "url_col": source.url_col,
        "id_col": source.id_col,
        "rows": n_rows,
        "status_counts": dict(sorted(counts.items())),
        "partition_rows": options.partition_rows,
        "batch_size": options.batch_size,
        "runtime": sorted(runtimes),
        "seconds": round(seconds, 3),
        "images_per_second": round((counts.get(OK, 0) - ok_before) / seconds, 2) if seconds
        else None,
        "stages": _stage_summary(stage_seconds, counts.get(OK, 0) - ok_before,
                                 n_rows - len(done_rows)),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return writer.finish(meta)


def _plan(source: CsvSource, options: ExtractOptions, weights: Weights, n_rows: int,
          dim: int) -> dict:
    """What fixes the extraction's output: a resumed run must agree on all of it."""
    csv = {"csv": source.path}
    if "://" not in source.path:
        stat = Path(source.path).stat()
        csv = {"csv": str(Path(source.path).resolve()), "csv_bytes": stat.st_size,
               "csv_mtime_ns": stat.st_mtime_ns}
    fetch = {key: getattr(options.fetch, key) for key in (
        "schemes", "public_only", "allow_link_local", "root", "max_bytes", "max_pixels")}
    return {**csv, "rows": n_rows, "dim": dim, "partition_rows": options.partition_rows,
            "model": options.model,  # a file's hash; random or package weights by name
            "weights": weights.sha256 if weights.data is not None else weights.source,
            "fetch": {k: list(v) if isinstance(v, tuple) else v for k, v in fetch.items()},
            "fields": list(source.keep), "url_col": source.url_col, "id_col": source.id_col,
            "delimiter": source.delimiter, "header": source.header}


def _stage_summary(stage_seconds: dict[str, float], images: int, rows: int) -> dict:
    """Task seconds per stage (summed over tasks) and the rate one task slot achieved."""
    def rate(count: int, seconds: float) -> float | None:
        return round(count / seconds, 2) if seconds else None

    return {"fetch": {"task_seconds": round(stage_seconds["fetch"], 3),
                      "rows_per_task_second": rate(rows, stage_seconds["fetch"])},
            "embed": {"task_seconds": round(stage_seconds["embed"], 3),
                      "images_per_task_second": rate(images, stage_seconds["embed"])}}


def _count(counts: dict[str, int], rows) -> None:
    """Add the rows' statuses to `counts`."""
    if len(rows):
        for status, count in rows["status"].value_counts().items():
            counts[str(status)] = counts.get(str(status), 0) + int(count)


def _failed(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k != OK)


def _fetch_slots(client: Client, fetch_resources: dict | None) -> int:
    workers = cluster_workers(client).values()
    if fetch_resources:
        return int(sum(w.get("resources", {}).get(NET, 0) for w in workers))
    return int(sum(w.get("nthreads", 1) for w in workers))


def _progress_bar(enabled: bool, total: int, desc: str, initial: int, position: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="row", desc=desc, position=position,
                disable=None if enabled else True,  # None: off where stderr is no terminal
                dynamic_ncols=True, smoothing=0.05)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("imgsim-dask", "dask", "distributed", "keras", "tensorflow", "tensorflow-cpu",
                    "zarr", "numpy", "pandas", "pillow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
