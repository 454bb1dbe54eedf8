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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distributed import Client, as_completed

from .cluster import GPU, NET, connect, workers_with
from .embed import ModelPlugin, embed_partition
from .errors import ImgsimError, InputError, StoreError
from .fetch import OK, FetchOptions, fetch_partition
from .ingest import CsvSource, assemble_partition, count_rows, inspect_csv, plan_partitions, read_blocks
from .models import Weights, get_spec, resolve_weights
from .store import DEFAULT_STORE, FeatureStore, StoreWriter

logger = logging.getLogger(__name__)

TASK_RETRIES = 2  # a task lost with its worker is recomputed elsewhere


@dataclass(frozen=True)
class ExtractOptions:
    """Everything that shapes an extraction besides its input and output."""

    model: str = "mobilenet"
    weights: str | None = None
    batch_size: int = 64
    partition_rows: int = 512
    fetch: FetchOptions = field(default_factory=FetchOptions)
    overwrite: bool = False
    progress: bool = False


def extract(
    csv: str,
    name: str,
    store: str = DEFAULT_STORE,
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
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
    `DASK_SCHEDULER_ADDRESS`), else on an embedded local cluster. Keyword arguments named
    like `ExtractOptions` fields (`model=`, `batch_size=`, ...) override `options`.
    """
    options = _merge_options(options, option_fields)
    source = inspect_csv(csv, delimiter, header, cols, url_col, id_col)
    spec = get_spec(options.model)
    if options.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if (Path(store) / name).exists() and not options.overwrite:
        raise StoreError(f"source {name!r} already exists in {store}; pass --overwrite to replace it")
    weights = resolve_weights(options.model, options.weights)
    fetch_options = FetchOptions(**{**asdict(options.fetch), "image_size": spec.image_size,
                                    "base_dir": source.base_dir})
    with connect(scheduler, client, workers) as active:
        logger.info("dashboard: %s", active.dashboard_link)
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
    gpu_workers = workers_with(client, GPU)
    if not gpu_workers:
        raise ImgsimError("no worker has the GPU resource, so no task could run the model; "
                          "start one with: dask worker ADDRESS --resources GPU=1 --nthreads 1")
    fetch_resources = {NET: 1} if workers_with(client, NET) else None

    blocks = read_blocks(source)
    block_lengths = count_rows(blocks)
    n_rows = sum(block_lengths)
    if n_rows == 0:
        raise InputError(f"{source.path}: no data rows (only a header?)")
    plan = plan_partitions(block_lengths, options.partition_rows)
    spec = get_spec(options.model)

    plugin = ModelPlugin(weights)
    client.register_plugin(plugin)
    writer = StoreWriter(store, name, n_rows, spec.dim, options.partition_rows, options.overwrite)

    token = uuid.uuid4().hex[:8]
    delayed_blocks = blocks.to_delayed()
    last_use = {block: k for k, pieces in enumerate(plan) for block, _, _ in pieces}
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
        rows = client.submit(assemble_partition, first_row, slices, list(source.keep), key=f"rows-{k:05d}-{token}",
                             retries=TASK_RETRIES)
        fetched = client.submit(fetch_partition, rows, source.url_col, fetch_options,
                                key=f"fetch-{k:05d}-{token}", resources=fetch_resources,
                                retries=TASK_RETRIES)
        return client.submit(embed_partition, fetched, plugin.name, options.batch_size,
                             key=f"embed-{k:05d}-{token}", resources={GPU: 1},
                             retries=TASK_RETRIES)

    window = 2 * len(gpu_workers) + _fetch_slots(client, fetch_resources) + 2
    index_of = {}
    in_flight = as_completed()
    next_k = 0
    while next_k < min(window, len(plan)):
        future = submit(next_k)
        index_of[future.key] = next_k
        in_flight.add(future)
        next_k += 1

    counts: dict[str, int] = {}
    progress = _progress_bar(options.progress, n_rows, name)
    try:
        for future in in_flight:
            features, rows = future.result()
            writer.write_partition(index_of.pop(future.key), features, rows)
            for status, count in rows["status"].value_counts().items():
                counts[str(status)] = counts.get(str(status), 0) + int(count)
            progress.update(len(rows))
            progress.set_postfix(failed=_failed(counts), refresh=False)
            if next_k < len(plan):
                nxt = submit(next_k)
                index_of[nxt.key] = next_k
                in_flight.add(nxt)
                next_k += 1
    finally:
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
        "seconds": round(seconds, 3),
        "images_per_second": round(counts.get(OK, 0) / seconds, 2) if seconds else None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return writer.finish(meta)


def _failed(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k != OK)


def _fetch_slots(client: Client, fetch_resources: dict | None) -> int:
    workers = client.scheduler_info()["workers"].values()
    if fetch_resources:
        return int(sum(w.get("resources", {}).get(NET, 0) for w in workers))
    return int(sum(w.get("nthreads", 1) for w in workers))


def _progress_bar(enabled: bool, total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=f"extract {name}", disable=not enabled,
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
