"""Driver: wire ingest -> fetch -> embed -> store on a Dask cluster, in three steps.

- plan (`plan_extraction`): check the CSV and options, fix the row ids and partitions, open
  (or resume) the source, and decide which partitions, or which rows of them, to do;
- submit (`_Submitter`): per partition k the tasks `rows-k` (slice of the CSV blocks,
  fixed row ids) -> `fetch-k` (CPU workers, resource `NET` when the cluster has it) ->
  `embed-k` (workers with resource `GPU`) -> `store-k` (a worker writes the partition into
  the store), at most a window of partitions in flight (`pipeline.bounded`); the driver
  receives only each partition's counts, so its memory stays flat whatever the input size;
- seal (`seal`): write meta.json, the commit point.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
from distributed import Client, Future, span
from tqdm.auto import tqdm

from .about import PACKAGE
from .cluster import GPU, NET, Cluster, cluster_workers, connect, require_workers, workers_with
from .embed import EmbeddedPartition, ModelPlugin, embed_partition
from .errors import InputError, StoreError, opt
from .fetch import fetch_partition
from .ingest import CsvFile, Piece, assemble_partition, cut_partitions, inspect_csv, read_blocks
from .models import RANDOM, Weights, get_spec, resolve_weights
from .options import (
    DEFAULT_STORE,
    TASK_RETRIES,
    CsvOptions,
    ExtractOptions,
    FetchOptions,
    set_fields,
    with_overrides,
)
from .pipeline import bounded, compute_all
from .schema import (
    FETCH_KEYS_ADDED,
    OK,
    PLAN_KEYS_ADDED,
    TRANSIENT_STATUSES,
    SourceMeta,
    SourcePlan,
)
from .store import (
    PLAN,
    Location,
    PartitionStore,
    Source,
    SourceAppender,
    SourceWriter,
    check_name,
    check_plan,
    check_store,
    check_writable,
    is_complete,
    open_source,
    read_appends,
    store_path,
    stored_plan,
)

logger = logging.getLogger(__name__)
# rows up to which a plain local run's workers are threads of this process: worker
# processes win from about 1,000 images on (docs/benchmarks.md, scripts/bench_startup.py)
IN_PROCESS_ROWS = 256


def extract(
    csv: str,
    name: str,
    store: str = DEFAULT_STORE,
    *,
    cluster: Cluster = None,
    csv_options: CsvOptions | None = None,
    options: ExtractOptions | None = None,
    **fields: Any,
) -> Source:
    """Extract features for every row of `csv` into `store/name` and return the stored source.

    `cluster` says where it runs (see `cluster.connect`): a `Client`, a scheduler address,
    `ClusterOptions`, or None for `DASK_SCHEDULER_ADDRESS` or else an embedded local
    cluster. Keyword arguments named like `ExtractOptions` or `CsvOptions` fields
    (`model=`, `batch_size=`, `url_col=`, ...) override `options` and `csv_options`.
    """
    options, csv_options = with_overrides(
        fields, options or ExtractOptions(), csv_options or CsvOptions()
    )
    check_store(store)
    check_name(name)
    check_writable(store)
    if options.append or options.resume or options.retry_failed:
        _check_no_append_pending(store_path(store) / name, options)
        options, csv_options = adopt_plan(
            store_path(store) / name,
            options,
            csv_options,
            set(fields) | set_fields(options, csv_options),
        )
    csv_file = inspect_csv(csv, csv_options)
    if options.append:
        weights = resolve_weights(options.model, options.weights)
        _check_append(store_path(store) / name, csv_file, options, weights)
        with connect(cluster, small=is_small(csv_file)) as client:
            return extract_on(client, csv_file, name, store, options, weights)
    if (store_path(store) / name).exists() and not (
        options.overwrite or options.resume or options.retry_failed
    ):
        raise StoreError(
            f"source {name!r} already exists in {store}; pass {opt('overwrite')} to "
            f"replace it (or {opt('resume')} to continue an interrupted extraction)"
        )
    weights = resolve_weights(options.model, options.weights)
    if (options.resume or options.retry_failed) and (store_path(store) / name / PLAN).is_file():
        # before any cluster work; the row count alone waits for the scan, and it cannot
        # change unless the CSV's size or time did
        rows = stored_plan(store_path(store) / name).get("rows", 0)
        dim = get_spec(options.model).dim
        check_plan(store_path(store) / name, source_plan(csv_file, options, weights, rows, dim))
        if options.resume and not options.retry_failed and is_complete(store, name):
            logger.debug("%s: already complete in %s, nothing to do", name, store)
            return Source(store_path(store) / name)  # no cluster needed
    retrying = options.retry_failed or options.resume  # (a resume goes on with a retry)
    appended = _appended_csvs(store_path(store) / name, csv_options) if retrying else []
    with connect(cluster, small=is_small(csv_file)) as client:
        return extract_on(client, csv_file, name, store, options, weights, appended)


def is_small(csv_file: CsvFile) -> bool:
    """Whether the CSV has so few rows that worker processes would cost more than they save."""
    return csv_file.rows is not None and csv_file.rows <= IN_PROCESS_ROWS


def extract_on(
    client: Client,
    csv_file: CsvFile,
    name: str,
    store: str,
    options: ExtractOptions,
    weights: Weights,
    appended: list[Appended] | None = None,
) -> Source:
    """The extraction on a connected client: plan, submit every partition, seal. A retry
    of a source with rows `appended` retries each CSV's failed rows from it, in turn."""
    started = time.perf_counter()
    gpu_workers = require_workers(client, fetch=True, stage="embed")
    compute = lambda tasks: compute_all(client, tasks)  # noqa: E731
    job = plan_extraction(
        csv_file, name, store, options, weights, compute, Segment(0) if appended else None
    )
    if job.writer.complete and not appended:
        logger.info("%s: already complete in %s, nothing to do", name, store)
        return Source(job.writer.path)
    check_workers_see(client, job.writer.partitions)
    if job.first_row:
        last = job.first_row + job.plan.rows - 1
        logger.info("%s: appending %d rows, rows %d-%d", name, job.plan.rows, job.first_row, last)
    elif job.writer.done and len(job.writer.done) < len(job.partitions):
        logger.info(
            "%s: resuming, %d of %d partitions already written",
            name,
            len(job.writer.done),
            len(job.partitions),
        )
    plugin = ModelPlugin(
        weights,
        options.runtime,
        options.resolved_descriptor().pooling,
        options.resolved_image_size(),
    )
    client.register_plugin(plugin)
    fetch_resources = {NET: 1} if workers_with(client, NET) else None
    window = 2 * len(gpu_workers) + _fetch_slots(client, fetch_resources) + 2
    slots = _model_slots(client, gpu_workers)  # now: a worker may be lost during the run
    pipeline_started = time.perf_counter()
    changed = bool(job.todo)
    _run_pipeline(client, job, plugin.name, fetch_resources, window)
    for more in appended or []:
        job = plan_extraction(
            more.csv_file,
            name,
            store,
            options,
            weights,
            compute,
            Segment(more.first_row, more.rows, job),
        )
        changed = changed or bool(job.todo)
        _run_pipeline(client, job, plugin.name, fetch_resources, window)
    if not changed:  # (a grown source with no failed rows to retry: it stays as it was)
        logger.info("%s: no rows to retry in %s, nothing to do", name, store)
        return Source(job.writer.path)
    slot_seconds = slots * (time.perf_counter() - pipeline_started)
    return seal(job, time.perf_counter() - started, slot_seconds)


def _run_pipeline(
    client: Client,
    job: ExtractionJob,
    plugin_name: str,
    fetch_resources: dict[str, int] | None,
    window: int,
) -> None:
    """Submit the job's partitions, at most `window` in flight, and count each one stored."""
    progress = _Progress(job.options.progress, job)
    submit = _Submitter(client, job, plugin_name, fetch_resources, progress.fetched.update)
    try:
        with bounded(client, job.todo, submit, window) as finished:
            for k, future in finished:
                stored: StoredPartition = future.result()
                job.record(k, stored)
                progress.embedded(stored.rows, job.failed)
    except BaseException as exc:
        # The pipeline cancelled the embed futures still in flight: nothing depends on them,
        # and the scheduler then releases their fetch and rows tasks. Cancelling a CSV block
        # future too made the scheduler recurse into rows tasks no client holds and fail
        # `assert ts.who_wants` (Scheduler.stimulus_cancel), so the blocks are only released.
        submit.release_blocks()
        if isinstance(exc, KeyboardInterrupt):
            done = (
                "while retrying failed rows"
                if job.retry
                else f"with {len(job.writer.written())} of {len(job.partitions)} partitions written"
            )
            then = "run this append again" if job.options.append else "continue with --resume"
            logger.warning("%s: interrupted %s; %s", job.name, done, then)
        raise
    finally:
        progress.close()


@dataclass(frozen=True)
class Appended:
    """The CSV an append read, and the first of the rows it added."""

    csv_file: CsvFile
    first_row: int
    rows: int


@dataclass(frozen=True)
class Segment:
    """A retry of the rows of one of a grown source's CSVs, from `first_row` on (`rows` of
    them; the whole source's first CSV when None). `after`: the retry of the CSV before,
    whose counts and times this one goes on from."""

    first_row: int
    rows: int | None = None
    after: ExtractionJob | None = None


@dataclass
class ExtractionJob:
    """What an extraction is to do, and the counts of what it has done so far."""

    csv_file: CsvFile
    name: str
    options: ExtractOptions
    weights: Weights
    fetch: FetchOptions  # the options' fetch, sized for the model and rooted at the CSV
    plan: SourcePlan
    blocks: list  # the CSV's byte blocks, parsed lazily (`ingest.read_blocks`)
    partitions: list[list[Piece]]
    writer: SourceWriter | SourceAppender
    retry: dict[int, list[int]]  # partition -> its rows to fetch again
    done_rows: int  # rows already stored before this run (an append: its own rows only)
    total_rows: int  # rows the summary counts: the source's (an append: its own)
    first_row: int = 0  # where its partitions start: an append's first row, a segment's
    counts: dict[str, int] = field(default_factory=dict)  # status -> rows, stored so far
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"fetch": 0.0, "embed": 0.0, "store": 0.0}
    )
    runtimes: set[str] = field(default_factory=set)  # what `auto` became on the model workers
    ok_before: int = 0

    @property
    def todo(self) -> list[int]:
        """The partitions to submit: those not written yet, then those with rows to retry."""
        return [k for k in range(len(self.partitions)) if k not in self.writer.done] + sorted(
            self.retry
        )

    def merged(self, k: int) -> bool:
        """Whether partition k's rows go into its stored part (a retry, an append's top-up)."""
        return k in self.retry or k == getattr(self.writer, "top_up", None)

    def first_row_of(self, k: int) -> int:
        return max(k * self.options.partition_rows, self.first_row)

    @property
    def failed(self) -> int:
        return sum(count for status, count in self.counts.items() if status != OK)

    def rows_of(self, k: int) -> int:
        """Rows that partition k's tasks handle in this run."""
        if k in self.retry:
            return len(self.retry[k])
        return sum(stop - start for _, start, stop in self.partitions[k])

    def record(self, k: int, stored: StoredPartition) -> None:
        """Count one partition a worker has stored."""
        self.writer.done.add(k)
        for status, count in stored.counts.items():
            self.counts[status] = self.counts.get(status, 0) + count
        self.runtimes.add(stored.runtime)
        for stage, seconds in stored.seconds.items():
            self.stage_seconds[stage] += seconds


@dataclass(frozen=True)
class StoredPartition:
    """What the driver hears of a partition a worker has written: counts, never features."""

    rows: int
    counts: dict[str, int]
    seconds: dict[str, float]
    runtime: str


def store_partition(
    embedded: EmbeddedPartition, partitions: PartitionStore, k: int, retry: bool
) -> StoredPartition:
    """Task `store-k`: write partition k where the source is stored (some of its rows only,
    for `retry`), and report its counts."""
    started = time.perf_counter()
    if retry:
        partitions.rewrite(k, embedded.features, embedded.rows)
    else:
        partitions.write(k, embedded.features, embedded.rows)
    counts: dict[str, int] = {}
    _count(counts, embedded.rows)
    seconds = {**embedded.seconds, "store": time.perf_counter() - started}
    return StoredPartition(len(embedded.rows), counts, seconds, embedded.runtime)


def plan_extraction(
    csv_file: CsvFile,
    name: str,
    store: str,
    options: ExtractOptions,
    weights: Weights,
    compute: Callable | None = None,
    segment: Segment | None = None,
) -> ExtractionJob:
    """Count the CSV's rows (the scan tasks run by `compute`, default `dask.compute`), cut
    the partitions, and open (or resume) the source. With `segment`, a retry of a source
    with rows appended covers only the rows this CSV gave it."""
    spec = get_spec(options.model)
    blocks, block_lengths = read_blocks(csv_file, compute=compute)
    n_rows = sum(block_lengths)
    if n_rows == 0:
        raise InputError(f"{csv_file.path}: no data rows (only a header?)")
    plan = source_plan(csv_file, options, weights, n_rows, spec.dim)
    writer: SourceWriter | SourceAppender
    first_row = segment.first_row if segment else 0
    if options.append:
        writer = SourceAppender(store, name, plan.csv, n_rows)
        first_row = writer.first_row
        writer.start()
    else:
        if segment and segment.rows is not None:  # an appended CSV, with the first one's plan
            if n_rows != segment.rows:
                raise InputError(
                    f"{csv_file.path}: {n_rows} rows, but {segment.rows} were appended from it; "
                    f"it has changed since, so its failed rows cannot be fetched again"
                )
            plan = _as_stored_csv(store_path(store) / name, plan)
        resume = options.resume or options.retry_failed
        writer = SourceWriter(store, name, plan, options.overwrite, resume)
    # partition k holds rows [k * partition_rows, ...); those before the first are done
    partitions: list[list[Piece]] = [[] for _ in range(first_row // options.partition_rows)]
    partitions += cut_partitions(block_lengths, options.partition_rows, first_row)
    done_rows = writer.done_rows()
    total_rows = len(done_rows) if segment else plan.rows  # (a segment: the whole source's)
    retry: dict[int, list[int]] = {}
    if options.retry_failed or writer.retrying:  # (an interrupted retry goes on as one)
        mine = done_rows["row"].between(first_row, first_row + n_rows - 1)
        failed = done_rows.loc[done_rows["status"].isin(TRANSIENT_STATUSES) & mine, "row"]
        for row in failed.astype(int):
            retry.setdefault(row // options.partition_rows, []).append(row)
        of = f" of the rows appended from {csv_file.path}" if first_row else ""
        logger.info("%s: retrying %d row(s) with transient failures%s", name, len(failed), of)
        if retry:
            assert isinstance(writer, SourceWriter)  # (an append excludes a retry)
            writer.reopen()
        done_rows = done_rows[~done_rows["row"].isin(failed)]
    fetch = replace(
        options.fetch,
        image_size=options.resolved_image_size(),
        trim_borders=options.resolved_descriptor().trim_borders,
        base_dir=csv_file.base_dir,
    )
    job = ExtractionJob(
        csv_file,
        name,
        options,
        weights,
        fetch,
        plan,
        blocks,
        partitions,
        writer,
        retry,
        len(done_rows),
        total_rows,
        first_row=first_row,
    )
    _count(job.counts, done_rows)
    job.ok_before = job.counts.get(OK, 0)
    if segment and segment.after:  # the retry goes on: count the whole of it
        before = segment.after
        job.done_rows = before.done_rows - sum(len(rows) for rows in retry.values())
        job.ok_before, job.runtimes = before.ok_before, before.runtimes
        job.stage_seconds = before.stage_seconds
    return job


class _Submitter:
    """Submits a partition's rows -> fetch -> embed tasks; each CSV block is computed once
    and released after the last partition that reads it."""

    def __init__(
        self,
        client: Client,
        job: ExtractionJob,
        plugin_name: str,
        fetch_resources: dict[str, int] | None,
        on_fetched: Callable[[int], object],
    ):
        self.client, self.job, self.plugin_name = client, job, plugin_name
        self.fetch_resources = fetch_resources
        self.on_fetched = on_fetched  # called with the rows of each finished fetch task
        self.token = uuid.uuid4().hex[:8]
        self.last_use = {block: k for k in job.todo for block, _, _ in job.partitions[k]}
        self.block_futures: dict[int, Future] = {}

    def __call__(self, k: int) -> Future:
        client, job = self.client, self.job
        slices = []
        for block, start, stop in job.partitions[k]:
            if block not in self.block_futures:
                self.block_futures[block] = client.compute(job.blocks[block])
            slices.append((self.block_futures[block], start, stop))
            if self.last_use[block] == k:
                self.block_futures.pop(block)  # the rows task keeps it alive as long as needed
        first_row = job.first_row_of(k)
        with span("extract", job.name, "rows"):  # spans group the stages on the dashboard
            rows = client.submit(
                assemble_partition,
                first_row,
                slices,
                list(job.csv_file.keep),
                job.retry.get(k),
                key=f"rows-{k:05d}-{self.token}",
                retries=TASK_RETRIES,
            )
        with span("extract", job.name, "fetch"):
            fetched = client.submit(
                fetch_partition,
                rows,
                job.csv_file.url_col,
                job.fetch,
                key=f"fetch-{k:05d}-{self.token}",
                resources=self.fetch_resources,
                retries=TASK_RETRIES,
            )
        size = job.rows_of(k)
        fetched.add_done_callback(
            lambda f: self.on_fetched(size) if f.status == "finished" else None
        )
        with span("extract", job.name, "embed"):
            embedded = client.submit(
                embed_partition,
                fetched,
                self.plugin_name,
                job.options.batch_size,
                key=f"embed-{k:05d}-{self.token}",
                resources={GPU: 1},
                retries=TASK_RETRIES,
            )
        with span("extract", job.name, "store"):
            return client.submit(
                store_partition,
                embedded,
                job.writer.partitions,
                k,
                job.merged(k),
                key=f"store-{k:05d}-{self.token}",
                retries=TASK_RETRIES,
            )

    def release_blocks(self) -> None:
        for block_future in self.block_futures.values():
            block_future.release()


class _Progress:
    """Two progress bars, rows fetched and rows embedded; off where stderr is no terminal."""

    def __init__(self, enabled: bool, job: ExtractionJob):
        total = job.total_rows
        self.fetched = _bar(enabled, total, f"fetch {job.name}", job.done_rows, 0)
        self.stored = _bar(enabled, total, f"embed {job.name}", job.done_rows, 1)

    def embedded(self, rows: int, failed: int) -> None:
        self.stored.update(rows)
        self.stored.set_postfix(failed=failed, refresh=False)

    def close(self) -> None:
        self.fetched.close()
        self.stored.close()


def _bar(enabled: bool, total: int, desc: str, initial: int, position: int) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="row",
        desc=desc,
        position=position,
        disable=None if enabled else True,  # None: off where stderr is no terminal
        dynamic_ncols=True,
        smoothing=0.05,
    )


def seal(job: ExtractionJob, seconds: float, slot_seconds: float) -> Source:
    """Write the source's meta.json: after this it opens as complete. `slot_seconds`: the
    model slots' time from the first submit to the last partition stored."""
    spec = get_spec(job.options.model)
    ok_new = job.counts.get(OK, 0) - job.ok_before
    if isinstance(job.writer, SourceAppender):
        return job.writer.finish(job.counts, seconds=round(seconds, 3))
    descriptor = job.options.resolved_descriptor()
    meta = SourceMeta(
        name=job.name,
        model=job.options.model,
        dim=spec.dim,
        threshold=spec.threshold_for(descriptor.name, job.options.resolved_image_size()),
        descriptor=descriptor.key,
        image_size=job.options.resolved_image_size(),
        weights=job.weights.description,
        weights_sha256=job.weights.sha256,
        csv=job.plan.csv,
        fields=list(job.csv_file.keep),
        url_col=job.csv_file.url_col,
        id_col=job.csv_file.id_col,
        rows=job.total_rows,
        status_counts=dict(sorted(job.counts.items())),
        partition_rows=job.options.partition_rows,
        batch_size=job.options.batch_size,
        runtime=sorted(job.runtimes),
        seconds=round(seconds, 3),
        images_per_second=round(ok_new / seconds, 2) if seconds else None,
        stages=_stage_summary(
            job.stage_seconds, ok_new, job.total_rows - job.done_rows, slot_seconds
        ),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        versions=_versions(),
    )
    return job.writer.finish(meta)


def reuse_complete(
    csv_file: CsvFile, name: str, store: str, options: ExtractOptions, given: set[str]
) -> Source | None:
    """The sealed source `store/name` when it was made from this CSV with these options, so
    that nothing needs doing; None when there is none (or `overwrite`); a one-line
    `PlanMismatch` when it was made otherwise. Unless `given` names `weights`, its weights
    count as given, so nothing is resolved (or downloaded) to reuse it."""
    if options.overwrite or not is_complete(store, name):
        return None
    path = store_path(store) / name
    weights = resolve_weights(options.model, options.weights) if "weights" in given else None
    n_rows = sum(read_blocks(csv_file)[1])
    plan = source_plan(csv_file, options, weights, n_rows, get_spec(options.model).dim)
    if weights is None:
        plan = replace(plan, weights=stored_plan(path).get("weights", ""))
    check_plan(path, plan)
    return Source(path)


def _check_no_append_pending(path: Location, options: ExtractOptions) -> None:
    """`--append` needs a source to add to; `--resume` and `--retry-failed` refuse a source
    with an append in progress (running that append again finishes it)."""
    if options.append and not (path / PLAN).is_file():
        open_source(str(path.parent), path.name)  # no such source: its one-line error
    appends = read_appends(path)
    pending = [a for a in appends if not a.get("done")]
    if options.append or not appends:
        return
    if pending:
        raise StoreError(
            f"an append to {path.name!r} of {pending[-1]['from']} was interrupted; finish it "
            f"by running that append again ({opt('append')})"
        )


def _appended_csvs(path: Location, csv_options: CsvOptions) -> list[Appended]:
    """The CSVs the appends to the source at `path` read, in order, for a retry of their
    failed rows; a one-line error for one that is gone."""
    appended = []
    for record in read_appends(path):
        try:
            csv_file = inspect_csv(record["from"], csv_options)
        except InputError as exc:
            raise InputError(
                f"rows {record['first_row']}-{record['first_row'] + record['rows'] - 1} of "
                f"{path.name!r} were appended from a CSV that cannot be read again: {exc}"
            ) from None
        appended.append(Appended(csv_file, record["first_row"], record["rows"]))
    return appended


def _as_stored_csv(path: Location, plan: SourcePlan) -> SourcePlan:
    """`plan` with the CSV and row count of the source at `path`'s own plan: the options of
    another CSV (an append's) checked against those the source was made with."""
    stored = stored_plan(path)
    return replace(
        plan,
        csv=stored["csv"],
        rows=stored["rows"],
        csv_bytes=stored.get("csv_bytes"),
        csv_mtime_ns=stored.get("csv_mtime_ns"),
    )


def _check_append(
    path: Location, csv_file: CsvFile, options: ExtractOptions, weights: Weights
) -> None:
    """An append takes the options the source was made with (`adopt_plan`): a given one that
    differs is refused in one line, before any cluster starts."""
    dim = get_spec(options.model).dim
    plan = source_plan(csv_file, options, weights, 1, dim)  # (its CSV and rows: the stored)
    check_plan(path, _as_stored_csv(path, plan))


def adopt_plan(
    path: Location, options: ExtractOptions, csv_options: CsvOptions, given: set[str]
) -> tuple[ExtractOptions, CsvOptions]:
    """The options the source at `path` was made with (its plan.json), except those named in
    `given`, so that `--resume` and `--retry-failed` need not repeat them; unchanged where
    there is no plan. A given option that differs is refused later, by `check_plan`."""
    if options.overwrite or not (path / PLAN).is_file():
        return options, csv_options
    stored = stored_plan(path)
    made = {key: stored[key] for key in ("model", "partition_rows") if key in stored}
    made["descriptor"] = {**PLAN_KEYS_ADDED, **stored}["descriptor"].split("/")[0]
    made["image_size"] = {**PLAN_KEYS_ADDED, **stored}["image_size"]
    if "weights" not in given and "model" not in given:
        made["weights"] = made_weights(stored)
    fetch = {key: value for key, value in made_fetch(stored).items() if key not in given}
    csv = {
        key: stored[key] for key in ("url_col", "id_col", "delimiter", "header") if key in stored
    }
    if "fields" in stored:
        csv["cols"] = tuple(stored["fields"])
    options = replace(
        options,
        fetch=replace(options.fetch, **fetch),
        **{key: value for key, value in made.items() if key not in given},
    )
    csv_options = replace(
        csv_options, **{key: value for key, value in csv.items() if key not in given}
    )
    return options, csv_options


def made_weights(stored: dict) -> str | None:
    """The weights a source's plan.json says it was made with, as the option names them: a
    file's path, `random`, or None (the model's own)."""
    return stored.get("weights_file") or (
        RANDOM if str(stored.get("weights", "")).startswith(RANDOM) else None
    )


def made_fetch(stored: dict) -> dict[str, Any]:
    """The `FetchOptions` fields a source's plan.json records (JSON lists as tuples again)."""
    fields = {f.name for f in dataclasses.fields(FetchOptions)}
    return {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in {**FETCH_KEYS_ADDED, **stored.get("fetch", {})}.items()
        if key in fields
    }


def source_plan(
    csv_file: CsvFile, options: ExtractOptions, weights: Weights | None, n_rows: int, dim: int
) -> SourcePlan:
    """What fixes the extraction's output: a resumed run must agree on all of it."""
    csv, size, mtime = csv_file.path, None, None
    if "://" not in csv_file.path:
        stat = Path(csv_file.path).stat()
        csv, size, mtime = str(Path(csv_file.path).resolve()), stat.st_size, stat.st_mtime_ns
    fetch = {
        key: getattr(options.fetch, key)
        for key in (
            "schemes",
            "public_only",
            "allow_link_local",
            "root",
            "max_bytes",
            "max_pixels",
            "thumbnails",
        )  # fmt: skip
    }
    weights_file = None
    if weights is not None and weights.data is not None and options.weights not in (None, RANDOM):
        weights_file = str(Path(options.weights).resolve())
    return SourcePlan(
        csv=csv,
        rows=n_rows,
        dim=dim,
        partition_rows=options.partition_rows,
        model=options.model,  # a file's hash; random or package weights by name
        weights=""
        if weights is None
        else weights.sha256
        if weights.data is not None
        else weights.description,
        fetch={k: list(v) if isinstance(v, tuple) else v for k, v in fetch.items()},
        fields=list(csv_file.keep),
        url_col=csv_file.url_col,
        id_col=csv_file.id_col,
        delimiter=csv_file.delimiter,
        header=csv_file.header,
        descriptor=options.resolved_descriptor().key,
        image_size=options.resolved_image_size(),
        csv_bytes=size,
        csv_mtime_ns=mtime,
        weights_file=weights_file,
    )


def _stage_summary(
    stage_seconds: dict[str, float], images: int, rows: int, slot_seconds: float
) -> dict:
    """Task seconds per stage (summed over tasks), the rate one task slot achieved, and how
    long the model slots waited for work while the partitions went through (`idle`: the
    slots' time in the pipeline less the embed tasks' time; fetching too slowly shows here)."""

    def rate(count: int, seconds: float) -> float | None:
        return round(count / seconds, 2) if seconds else None

    idle = max(0.0, slot_seconds - stage_seconds["embed"])
    return {
        "fetch": {
            "task_seconds": round(stage_seconds["fetch"], 3),
            "rows_per_task_second": rate(rows, stage_seconds["fetch"]),
        },
        "embed": {
            "task_seconds": round(stage_seconds["embed"], 3),
            "images_per_task_second": rate(images, stage_seconds["embed"]),
            "idle_seconds": round(idle, 3),
            "idle_share": round(idle / slot_seconds, 3) if slot_seconds else None,
        },
    }


def _model_slots(client: Client, gpu_workers: list[str]) -> int:
    """How many embed tasks (one `GPU` resource each) the cluster runs at once."""
    workers = cluster_workers(client)
    resources = [workers.get(w, {}).get("resources", {}) for w in gpu_workers]
    return max(1, sum(int(r.get(GPU, 0)) for r in resources))


def _count(counts: dict[str, int], rows: pd.DataFrame) -> None:
    """Add the rows' statuses to `counts`."""
    if len(rows):
        for status, count in rows["status"].value_counts().items():
            counts[str(status)] = counts.get(str(status), 0) + int(count)


def check_workers_see(client: Client, partitions: PartitionStore) -> None:
    """A one-line StoreError unless every worker sees the source's plan.json (the driver
    wrote it) where the workers are to write: a local store that is not shared with them,
    or object storage they have no credentials for, stops here, before any work."""

    def sees(partitions: PartitionStore) -> str:
        try:
            return "" if (partitions.path / PLAN).is_file() else "not there"
        except Exception as exc:  # any filesystem's own way of refusing
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"

    blind = {w: why for w, why in client.run(sees, partitions).items() if why}
    if blind:
        worker, why = next(iter(blind.items()))
        raise StoreError(
            f"{len(blind)} worker(s) cannot see the store at {partitions.url} ({worker}: "
            f"{why}); workers write their partitions there: use a directory shared with "
            "them, or object storage they can reach (s3://...)"
        )


def _fetch_slots(client: Client, fetch_resources: dict | None) -> int:
    workers = cluster_workers(client).values()
    if fetch_resources:
        return int(sum(w.get("resources", {}).get(NET, 0) for w in workers))
    return int(sum(w.get("nthreads", 1) for w in workers))


def _versions() -> dict[str, str]:
    found = {}
    for package in (
        PACKAGE,
        "dask",
        "distributed",
        "keras",
        "tensorflow",
        "tensorflow-cpu",
        "zarr",
        "numpy",
        "pandas",
        "pillow",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
