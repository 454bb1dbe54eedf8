"""Store: one extracted source, `STORE/NAME/`, and its HDF5 export.

A store is a local or shared directory, or any place fsspec reaches (`s3://bucket/prefix`,
`gs://...`, `file://...`), with each filesystem's own credentials and settings (for S3 the
`AWS_*` variables, `AWS_ENDPOINT_URL` included, or fsspec's config).

    features.zarr   rows x dim float32, row i <-> row i of the row table, NaN rows for failures
    rows.parquet/   one part file per partition: kept CSV fields, `row`, status columns
    plan.json       what the extraction was started with (`schema.SourcePlan`: rows, model,
                    weights, CSV...); `--resume` continues only one with the same plan
    meta.json       `schema.SourceMeta`: model, weights, dim, counts, timings, versions and
                    the store format; written last, so a source without it is incomplete
    appends.json    the rows each append added (ids continue) and where they came from

Workers write each partition (`PartitionStore`): its Zarr chunk, then its part file, put
in place whole (renamed on a filesystem, one PUT on object storage). Partitions are
chunk-aligned, so no two writers ever touch one chunk, and a partition is done once its
part file exists, which is what `--resume` relies on. The driver writes only plan.json and
meta.json, and never holds features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, cast

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from upath import UPath

from .errors import OptionError, StoreError, opt
from .schema import OK, PLAN_KEYS_ADDED, THUMBNAIL, SourceMeta, SourcePlan

FEATURES = "features.zarr"
ROWS = "rows.parquet"
META = "meta.json"
PLAN = "plan.json"
RETRYING = "retrying"  # present while rows of a source are being written again
APPENDS = "appends.json"  # the rows each append added, and where they came from
Location = Path | UPath  # a local path, or a place on any fsspec filesystem


def _file_mode() -> int:
    """The mode open() gives a new file under the current umask (mkstemp's files are 0600)."""
    try:  # Linux: read the umask without changing it (setting it races other threads)
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


_MAX_NAME_BYTES = 255  # the usual file-name limit


def store_path(store: str | os.PathLike) -> UPath:
    """Where a store is: a local path as given, or an fsspec URL (`s3://bucket/prefix`)."""
    text = os.fspath(store)
    return UPath(text.removeprefix("file://") if text.startswith("file://") else text)


def is_local(path: Location) -> bool:
    """True for a path on this machine's filesystem (not object storage)."""
    return getattr(path, "protocol", "") in ("", "file", "local")


def _zarr_location(path: Location) -> Any:
    """What zarr opens for `path`: the path itself, or an fsspec store for a URL."""
    if is_local(path):
        return str(path)
    return zarr.storage.FsspecStore.from_url(
        str(path), storage_options=getattr(path, "storage_options", {})
    )


def read_parquet(path: Location, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet file or directory of part files, local or not (names starting with `.` or
    `_`, such as temporary files, are left out).

    Remote files are fetched whole (concurrently) and parsed from memory. Handing pyarrow
    the fsspec filesystem instead lets its scan threads drop the last reference to that
    Python object later, and one that does so while the interpreter exits aborts the
    process ("terminate called without an active exception").
    """
    if is_local(path):
        return pd.read_parquet(path, columns=columns)
    remote = cast(UPath, path)
    fs = remote.fs
    if fs.isdir(remote.path):
        files = sorted(
            name
            for name in fs.ls(remote.path, detail=False)
            if not name.rsplit("/", 1)[-1].startswith((".", "_"))
        )
    else:
        files = [remote.path]
    blobs = fs.cat(files) if files else {}  # a list in, a dict out: fetched concurrently
    tables = [
        pq.read_table(pa.BufferReader(blob), columns=columns) for _, blob in sorted(blobs.items())
    ]
    if not tables:
        raise FileNotFoundError(f"no Parquet files in {path}")
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def atomic_write(path: Location, write) -> None:
    """Put a whole file in place, never a part of it: written through a temporary file in
    the same directory and renamed, or, on object storage, uploaded in one PUT."""
    local = is_local(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent) if local else None)
    os.close(fd)
    try:
        if local:
            os.chmod(tmp, _file_mode())
        write(tmp)
        if local:
            os.replace(tmp, str(path))
        else:
            remote = cast(UPath, path)
            remote.fs.put_file(tmp, remote.path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _remove_tree(path: Location) -> None:
    if is_local(path):
        shutil.rmtree(str(path), ignore_errors=True)
    else:
        remote = cast(UPath, path)
        remote.fs.rm(remote.path, recursive=True)


@dataclass(frozen=True)
class Source:
    """A complete extracted source: features, row table and metadata."""

    path: Location

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def meta(self) -> SourceMeta:
        """meta.json, read once."""
        return SourceMeta.from_json((self.path / META).read_text(), str(self.path))

    @property
    def features(self) -> zarr.Array:
        """The rows x dim float32 feature array (lazy, on disk)."""
        return zarr.open_array(_zarr_location(self.path / FEATURES), mode="r")

    @property
    def on_workers(self) -> StoredFeatures:
        """The features as workers read them, straight from the store."""
        return StoredFeatures(
            PartitionStore.of(self.path, self.meta.partition_rows), (self.meta.rows, self.meta.dim)
        )

    def rows(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The row table, sorted by row id (every column but the thumbnails by default)."""
        if columns is None:
            columns = [c for c in self.row_columns() if c != THUMBNAIL]
        table = read_parquet(self.path / ROWS, columns=columns)
        return table.sort_values("row", ignore_index=True) if "row" in table else table

    def row_columns(self) -> list[str]:
        """The row table's columns, as its first part file has them."""
        first = PartitionStore.of(self.path, self.meta.partition_rows).part(0)
        with first.open("rb") as f:
            return list(pq.read_schema(f).names)

    @property
    def has_thumbnails(self) -> bool:
        return THUMBNAIL in self.row_columns()

    def thumbnails(self, rows: np.ndarray) -> list[bytes | None]:
        """The stored thumbnail JPEG of each of `rows` (None: a failed row, or a source made
        without thumbnails)."""
        if not self.has_thumbnails:
            return [None] * len(rows)
        rows = np.asarray(rows, np.int64)
        store = PartitionStore.of(self.path, self.meta.partition_rows)
        parts = np.unique(rows // self.meta.partition_rows).tolist()
        stored = pd.concat(  # each part once, uncached: thumbnails are the bulk of a part
            [read_parquet(store.part(k), columns=["row", THUMBNAIL]) for k in parts]
            or [pd.DataFrame({"row": [], THUMBNAIL: []})]
        ).set_index("row")[THUMBNAIL]
        return [v if isinstance(v, bytes) else None for v in stored.reindex(rows).tolist()]

    def status_counts(self) -> dict[str, int]:
        counts = self.rows(["status"])["status"].value_counts()
        return {str(k): int(v) for k, v in counts.items()}

    def failures(self, status: str | None = None) -> pd.DataFrame:
        """The rows that gave no features (of one `status` if given), every column."""
        rows = self.rows()
        failed = rows[rows["status"] != OK] if status is None else rows[rows["status"] == status]
        return failed.reset_index(drop=True)

    def export_h5(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the original's layout: HDF5 dataset `data` (ok rows, row order) + a TSV of fields.

        `rows` holds each exported row's id in the row table. Features are copied one Zarr
        chunk at a time, so a source larger than memory exports too.
        """
        import h5py

        target = Path(path)
        if target.suffix.lower() not in (".h5", ".hdf5"):  # never a CSV written over by mistake
            raise StoreError(f"cannot write {target}: name the HDF5 file .h5 or .hdf5")
        if not target.parent.is_dir():
            raise StoreError(f"cannot write {target}: directory {target.parent} does not exist")
        rows = self.rows()
        ok = (rows["status"] == OK).to_numpy()
        features = self.features
        fields_path = target.with_name(f"{target.stem}_fields.csv")
        fields = rows.loc[ok, list(self.meta.fields)]
        need = int(ok.sum()) * features.shape[1] * 4 + int(ok.sum()) * 8
        free = shutil.disk_usage(target.parent).free
        if need > free:
            raise StoreError(
                f"cannot write {target}: it needs about {need / 2**20:,.0f} MiB, "
                f"{target.parent} has {free / 2**20:,.0f} MiB free"
            )

        def write_h5(tmp: str) -> None:
            with h5py.File(tmp, "w") as h5:
                data = h5.create_dataset(
                    "data", shape=(int(ok.sum()), features.shape[1]), dtype="float32"
                )
                h5.attrs["model"] = self.meta.model
                h5.attrs["descriptor"] = self.meta.descriptor
                if self.meta.image_size is not None:
                    h5.attrs["image_size"] = self.meta.image_size
                h5.create_dataset("rows", data=rows.loc[ok, "row"].to_numpy(np.int64))
                written, step = 0, features.chunks[0]
                for start in range(0, features.shape[0], step):
                    block = np.asarray(features[start : start + step])[ok[start : start + step]]
                    data[written : written + len(block)] = block
                    written += len(block)

        try:
            atomic_write(target, write_h5)
            atomic_write(fields_path, lambda tmp: fields.to_csv(tmp, sep="\t", index=False))
        except OSError as exc:
            raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from None
        return target, fields_path


def check_store(store: str | os.PathLike) -> str | os.PathLike:
    """`store` if its filesystem can be used here: a URL whose protocol needs a package
    that is not installed (s3fs for s3://, gcsfs for gs://) is one line naming it."""
    text = os.fspath(store)
    if "://" in text:
        protocol = text.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise OptionError(f"{opt('store')} {store}: {exc}".split("\n")[0]) from None
    return store


@dataclass(frozen=True)
class PartitionStore:
    """Writes the partitions of one source where it is stored; small, so it travels to the
    workers, which write their partitions themselves. `url`: an absolute local path (the
    same for every worker on a shared directory) or an fsspec URL."""

    url: str
    storage_options: dict
    chunk_rows: int

    @classmethod
    def of(cls, path: Location, chunk_rows: int) -> PartitionStore:
        url = str(Path(str(path)).absolute()) if is_local(path) else str(path)
        return cls(url, dict(getattr(path, "storage_options", {}) or {}), chunk_rows)

    @property
    def path(self) -> UPath:
        return UPath(self.url, **self.storage_options)

    def part(self, index: int) -> UPath:
        return self.path / ROWS / f"part-{index:05d}.parquet"

    def features(self) -> zarr.Array:
        return zarr.open_array(_zarr_location(self.path / FEATURES), mode="r")

    def fields(self, rows: np.ndarray, columns: list[str], run: str = "") -> pd.DataFrame:
        """`columns` of rows `rows` (in that order, repeats allowed), read from the part files
        that hold them; parts stay cached in this process for later calls of the same `run`."""
        rows = np.asarray(rows, dtype=np.int64)
        options = json.dumps(self.storage_options, sort_keys=True)
        indexes = np.unique(rows // self.chunk_rows).tolist() or [0]  # none: part 0's types
        table = pd.concat(
            [
                _cached_part(self.url, options, self.chunk_rows, k, tuple(columns), run)
                for k in indexes
            ]
        )
        return table.loc[rows].reset_index(drop=True)

    def write(self, index: int, features: np.ndarray, rows: pd.DataFrame) -> None:
        """Write partition `index` (rows [index*chunk_rows, ...)): its Zarr chunk, then its
        part file, which marks it done."""
        start = index * self.chunk_rows
        try:
            array = zarr.open_array(_zarr_location(self.path / FEATURES), mode="r+")
            array[start : start + len(features)] = features
            atomic_write(self.part(index), lambda tmp: rows.to_parquet(tmp, index=False))
        except OSError as exc:
            raise StoreError(
                f"cannot write partition {index} to {self.url}: "
                f"{exc.strerror or exc}; fix it, then continue with {opt('resume')}"
            ) from None

    def rewrite(self, index: int, features: np.ndarray, rows: pd.DataFrame) -> None:
        """Replace some rows of written partition `index` (`rows["row"]` names them), keeping
        the others as stored; doing it twice gives the same. A crash between the two writes
        leaves a rewritten row's new features beside its old (transient) status, which the
        next run rewrites again (the source's `retrying` mark is still set)."""
        stored = read_parquet(self.part(index))
        start = index * self.chunk_rows
        kept = stored[~stored["row"].isin(rows["row"])]
        merged = pd.concat([kept, rows[stored.columns]], ignore_index=True)
        array = zarr.open_array(_zarr_location(self.path / FEATURES), mode="r")
        chunk = np.asarray(array[start : start + len(merged)])  # rows beyond: appended ones
        chunk[rows["row"].to_numpy(np.int64) - start] = features
        self.write(
            index,
            chunk,
            merged.sort_values("row", ignore_index=True).astype(stored.dtypes.to_dict()),
        )


@lru_cache(maxsize=1024)  # row-table parts a worker keeps while it joins fields to pairs
def _cached_part(
    url: str, options: str, chunk_rows: int, index: int, columns: tuple[str, ...], run: str
) -> pd.DataFrame:
    store = PartitionStore(url, json.loads(options), chunk_rows)
    return read_parquet(store.part(index), columns=["row", *columns]).set_index("row")


@dataclass(frozen=True)
class StoredFeatures:
    """A source's rows x dim features as the workers read them: small, so it travels in
    tasks; `read(start, stop)` reads rows from the store where it runs."""

    store: PartitionStore
    shape: tuple[int, int]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop`, C-contiguous and aligned float32 (what the kernel needs)."""
        return np.array(self.store.features()[start:stop], dtype=np.float32, order="C")

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.store.features()[key])

    @property
    def oindex(self) -> Any:
        return self.store.features().oindex


@dataclass(frozen=True)
class Listed:
    """One directory of a store as `imgsim ls` shows it; `meta` is None while incomplete."""

    name: str
    meta: SourceMeta | None
    plan: dict


def list_sources(store: str | os.PathLike) -> list[Listed]:
    """The sources in `store`, complete or not, by name; a one-line StoreError if `store` is
    no directory (other folders in it are left out)."""
    root = store_path(store)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise StoreError(f"no store at {store}: it {what}")
    found = []
    for path in sorted(root.iterdir()):
        if (
            not path.is_dir()
            or path.name.startswith(".")
            or not ((path / META).is_file() or (path / PLAN).is_file())
        ):
            continue
        try:
            meta = Source(path).meta if (path / META).is_file() else None
            plan = stored_plan(path) if (path / PLAN).is_file() else {}
        except (StoreError, ValueError, OSError):  # shown as damaged, not skipped
            meta, plan = None, {}
        found.append(Listed(path.name, meta, plan))
    return found


def check_writable(store: str | os.PathLike) -> None:
    """A one-line StoreError unless sources can be written in `store` (or it can be made),
    so that a read-only place, a missing bucket or refused credentials fail before any
    cluster starts, and never fall back to a local folder."""
    target = store_path(store)
    if not is_local(target):
        probe = target / f".imgsim-write-probe-{os.getpid()}"
        try:
            probe.fs.pipe_file(probe.path, b"")
            probe.fs.rm_file(probe.path)
        except Exception as exc:  # each filesystem reports a refusal its own way
            raise StoreError(
                f"cannot write in store {store}: {_reason(exc)}; check the address and "
                "credentials (for S3: AWS_* variables, AWS_ENDPOINT_URL)"
            ) from None
        return
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise StoreError(f"cannot create store {store}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=str(existing)):
            pass
    except OSError as exc:
        where = "" if existing == target else f" (it would be made in {existing})"
        raise StoreError(
            f"cannot write in store {store}{where}: {exc.strerror or exc}; pass "
            f"{opt('store')} a directory you can write"
        ) from None


def _reason(exc: BaseException) -> str:
    """One line saying why a filesystem call failed."""
    if isinstance(exc, FileNotFoundError):
        return f"not found ({' '.join(str(exc).split())[:160]})"
    if isinstance(exc, PermissionError):
        return f"access denied ({' '.join(str(exc).split())[:160]})"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_name(name: str) -> str:
    """`name` if it can name a source (one plain directory name), else a one-line StoreError."""
    if (
        not name
        or name != Path(name).name
        or name.startswith(".")
        or "\0" in name
        or len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES
    ):
        raise StoreError(
            f"invalid source name {name[:40]!r}{'...' if len(name) > 40 else ''}: "
            f"use a plain name like 'books' (at most {_MAX_NAME_BYTES} bytes, "
            f"no '/', not starting with '.')"
        )
    return name


def open_source(store: str | os.PathLike, name: str) -> Source:
    """Open a complete source by name, or raise a one-line `StoreError`."""
    root = store_path(store)
    path = root / check_name(name)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise StoreError(
            f"no store at {store}: it {what}; {opt('store')} names the directory extract wrote"
        )
    if not path.is_dir():
        known = (
            sorted(p.name for p in root.iterdir() if (p / META).is_file()) if root.is_dir() else []
        )
        hint = f" (known: {', '.join(known)})" if known else ""
        raise StoreError(f"no source named {name!r} in store {store}{hint}")
    if not (path / META).is_file():
        if not _is_source(path):
            raise _not_a_source(path)
        raise StoreError(
            f"source {name!r} in {store} is incomplete (the extraction did not "
            f"finish); continue it with {opt('resume')}, or start over with {opt('overwrite')}"
        )
    source = Source(path)
    source.meta  # noqa: B018  (read now: a store of an unknown format fails here, in one line)
    return source


class SourceWriter:
    """Creates (or resumes) a source and seals it with meta.json; its `partitions` (a
    `PartitionStore`) is what writes the partitions, on the workers.

    `plan` describes the extraction (row count, dim, partition size, model, weights, CSV);
    with `resume=True` an incomplete source started with the same plan is continued:
    `done` holds the partitions already written, which the caller skips (`complete` is
    set when there is nothing left to do).
    """

    def __init__(
        self,
        store: str | os.PathLike,
        name: str,
        plan: SourcePlan,
        overwrite: bool = False,
        resume: bool = False,
    ):
        self.path = store_path(store) / check_name(name)
        self.partitions = PartitionStore.of(self.path, plan.partition_rows)
        self.done: set[int] = set()
        self.complete = False
        self.retrying = False
        if resume and (self.path / PLAN).is_file():
            self._reopen(plan)
            return
        if resume and self.path.exists():
            if not _is_source(self.path):
                raise _not_a_source(self.path)
            raise StoreError(
                f"cannot resume {name!r} in {store}: it has no {PLAN} (not an "
                f"extraction of this version); pass {opt('overwrite')} to start over"
            )
        if self.path.exists() or self.path.is_symlink():
            if not (overwrite or resume):
                raise StoreError(
                    f"source {name!r} already exists in {store}; pass "
                    f"{opt('overwrite')} to replace it"
                )
            _remove_source(self.path)
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise self._cannot_create(exc) from None
        try:
            (self.path / ROWS).mkdir(exist_ok=True)
            n_rows, dim = plan.rows, plan.dim
            zarr.create_array(
                _zarr_location(self.path / FEATURES),
                shape=(n_rows, dim),
                chunks=(plan.partition_rows, dim),  # (not fewer: appends stay chunk-aligned)
                dtype="float32",
                fill_value=np.nan,
            )
            atomic_write(self.path / PLAN, lambda tmp: Path(tmp).write_text(_dumps(plan.to_json())))
        except BaseException as exc:  # leave nothing that neither --resume nor --overwrite take
            _remove_tree(self.path)
            if isinstance(exc, OSError):
                raise self._cannot_create(exc) from None
            raise

    def _cannot_create(self, exc: OSError) -> StoreError:
        return StoreError(f"cannot create {self.path}: {exc.strerror or exc}")

    def _reopen(self, plan: SourcePlan) -> None:
        """Continue an interrupted extraction, if it was started with the same plan."""
        check_plan(self.path, plan)
        self.complete = (self.path / META).is_file()
        self.retrying = (self.path / RETRYING).is_file()
        if not self.complete:
            for stray in (self.path / ROWS).glob(".*"):  # temporary files of an interrupted write
                stray.unlink()
        self.done = self.written()

    def written(self) -> set[int]:
        """The partitions whose part file is in place (written by whichever worker)."""
        return _written(self.path)

    def reopen(self) -> None:
        """Unseal a source so that some of its rows can be written again. Until it is sealed,
        `retrying` stays set, also for a later `--resume`: a row rewritten by halves (its
        features, not yet its status) is then fetched again, never sealed as it is."""
        (self.path / RETRYING).touch()
        (self.path / META).unlink(missing_ok=True)  # incomplete until sealed again
        self.complete = False
        self.retrying = True

    def done_rows(self) -> pd.DataFrame:
        """`row` and `status` of the partitions already written (empty for a fresh source)."""
        parts = [self.path / ROWS / f"part-{index:05d}.parquet" for index in sorted(self.done)]
        return (
            pd.concat(
                [read_parquet(p, columns=["row", "status"]) for p in parts], ignore_index=True
            )
            if parts
            else pd.DataFrame({"row": pd.Series(dtype="int64"), "status": pd.Series(dtype=str)})
        )

    def write_partition(self, index: int, features: np.ndarray, rows: pd.DataFrame) -> None:
        """Write partition `index` here (workers use `partitions` directly) and count it."""
        self.partitions.write(index, features, rows)
        self.done.add(index)

    def finish(self, meta: SourceMeta) -> Source:
        """Seal the source: after this it opens as complete."""
        try:
            atomic_write(self.path / META, lambda tmp: Path(tmp).write_text(meta.to_json()))
            (self.path / RETRYING).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot write {self.path / META}: {exc.strerror or exc}; fix it, "
                f"then continue with {opt('resume')}"
            ) from None
        return Source(self.path)


class SourceAppender:
    """Adds rows to a complete source: their ids continue after its last row, in new
    partitions (the first tops up a partial last partition). `start` records the append
    in appends.json, with the meta it had, and unseals the source; `finish` seals it again.
    An append interrupted before `finish` is continued by the same append (same origin and
    row count), rewriting what it had written; any other is refused until then."""

    def __init__(self, store: str | os.PathLike, name: str, origin: str, rows: int):
        self.path = store_path(store) / check_name(name)
        self.record = read_appends(self.path)
        pending = [a for a in self.record if not a.get("done")]
        if pending:
            last = pending[-1]
            if (last["from"], last["rows"]) != (origin, rows):
                raise StoreError(
                    f"an append to {name!r} of {last['rows']} rows from {last['from']} was "
                    f"interrupted; run that append again to finish it first"
                )
            self.before = SourceMeta.from_json(json.dumps(last["before"]), str(self.path))
            self.first_row = int(last["first_row"])
        else:
            self.before = open_source(store, name).meta
            self.first_row = self.before.rows
            self.record.append(
                {
                    "first_row": self.first_row,
                    "rows": rows,
                    "from": origin,
                    "before": json.loads(self.before.to_json()),
                }  # fmt: skip
            )
        self.rows = rows
        self.partitions = PartitionStore.of(self.path, self.before.partition_rows)
        self.complete = self.retrying = False  # (as a `SourceWriter` says)
        chunk = self.partitions.chunk_rows
        first = self.first_row // chunk
        # partitions not to write: the earlier ones, and those an interrupted try of this
        # append wrote (not a top-up of the last earlier one, which is written again)
        self.top_up = first if self.first_row % chunk else None
        self.done = set(range(first)) | {k for k in _written(self.path) if k != self.top_up}

    def start(self) -> None:
        """Record the append and grow the feature array; the source is incomplete until
        `finish`."""
        self._write_record()
        (self.path / META).unlink(missing_ok=True)
        location = _zarr_location(self.path / FEATURES)
        array = zarr.open_array(location, mode="r+")
        chunk, dim = self.partitions.chunk_rows, array.shape[1]
        if array.chunks[0] != chunk:  # a source smaller than a partition had one short chunk
            earlier = np.asarray(array[: self.first_row])
            array = zarr.create_array(
                location, shape=array.shape, chunks=(chunk, dim), dtype="float32",
                fill_value=np.nan, overwrite=True,
            )  # fmt: skip
            array[: self.first_row] = earlier
        array.resize((self.first_row + self.rows, dim))

    def written(self) -> set[int]:
        return _written(self.path)

    def done_rows(self) -> pd.DataFrame:
        """`row` and `status` of the appended rows written before an interruption."""
        parts = [
            self.partitions.part(k)
            for k in sorted(self.done)
            if k * self.partitions.chunk_rows >= self.first_row
        ]
        empty = pd.DataFrame({"row": pd.Series(dtype="int64"), "status": pd.Series(dtype=str)})
        return pd.concat(
            [empty, *(read_parquet(p, columns=["row", "status"]) for p in parts)], ignore_index=True
        )

    def pieces(self) -> list[tuple[int, int, int]]:
        """`(partition, first row, stop row)` of the rows appended, in order."""
        chunk = self.partitions.chunk_rows
        stop = self.first_row + self.rows
        starts = [self.first_row, *range((self.first_row // chunk + 1) * chunk, stop, chunk)]
        return [(s // chunk, s, min(stop, (s // chunk + 1) * chunk)) for s in starts if s < stop]

    def write(self, index: int, features: np.ndarray, rows: pd.DataFrame) -> None:
        """Write appended rows of partition `index`: merged into its part when it holds
        earlier rows (or an interrupted try of this append), else a new part."""
        if self.partitions.part(index).exists():
            self.partitions.rewrite(index, features, rows)
        else:
            self.partitions.write(index, features, rows)

    def finish(self, counts: dict[str, int], **changes: Any) -> Source:
        """Seal the source with the rows appended: `counts` are their statuses."""
        total = dict(self.before.status_counts)
        for status, count in counts.items():
            total[status] = total.get(status, 0) + count
        meta = dataclasses.replace(
            self.before,
            rows=self.first_row + self.rows,
            status_counts=dict(sorted(total.items())),
            **changes,
        )
        self.record[-1]["done"] = True
        self._write_record()
        atomic_write(self.path / META, lambda tmp: Path(tmp).write_text(meta.to_json()))
        return Source(self.path)

    def _write_record(self) -> None:
        atomic_write(
            self.path / APPENDS, lambda tmp: Path(tmp).write_text(_dumps({"appends": self.record}))
        )


def _written(path: Location) -> set[int]:
    """The partitions of the source at `path` whose part file is in place."""
    return {int(part.stem.split("-")[1]) for part in (path / ROWS).glob("part-*.parquet")}


def read_appends(path: Location) -> list[dict]:
    """appends.json of the source at `path` (empty when it never had rows appended)."""
    return json.loads((path / APPENDS).read_text())["appends"] if (path / APPENDS).is_file() else []


def stored_plan(path: Location) -> dict:
    """The plan.json document of the source at `path`."""
    return json.loads((path / PLAN).read_text())


# plan.json keys an option sets, and that option's name (the rest describe the CSV)
PLAN_OPTIONS = {
    "model": "model",
    "weights": "weights",
    "descriptor": "descriptor",
    "image_size": "image_size",
    "partition_rows": "partition_rows",
    "fields": "cols",
    "url_col": "url_col",
    "id_col": "id_col",
    "delimiter": "delimiter",
    "header": "header",
}


class PlanMismatch(StoreError):
    """A source was made otherwise than asked now; `option` names the option that differs
    (None where the CSV itself changed)."""

    def __init__(self, template: str, option: str | None):
        super().__init__(template)
        self.option = option


def check_plan(path: Location, plan: SourcePlan) -> None:
    """A one-line `PlanMismatch` unless the source at `path` was made with `plan`: it names
    the option and both values, or says how the CSV changed."""
    before, now = {**PLAN_KEYS_ADDED, **stored_plan(path)}, plan.to_json()
    changed = plan.differences(before)
    if not changed:
        return
    # name the cause, not a consequence (a new model changes dim and weights too)
    order = ["csv", "model", "weights", *PLAN_OPTIONS, "fetch"]
    key = min(changed, key=lambda k: order.index(k) if k in order else len(order))
    where = f"source {path.name!r} in {path.parent}"
    start_over = f"pass {opt('overwrite')} to start over, or use another {opt('name')}"
    if key == "csv":
        raise PlanMismatch(
            f"{where} was made from {before.get('csv')}, not {now.get('csv')}; {start_over}", None
        )
    if key not in order:  # rows, csv_bytes, csv_mtime_ns: the file is not what it was
        raise PlanMismatch(
            f"{where} was made from {now.get('csv')}, which has changed since "
            f"({_csv_change(before, now)}); {start_over}",
            None,
        )
    if key == "fetch":
        fetch_before, fetch_now = before.get("fetch", {}), now.get("fetch", {})
        key = min(
            k for k in set(fetch_before) | set(fetch_now) if fetch_before.get(k) != fetch_now.get(k)
        )
        option, was, asked = key, fetch_before.get(key), fetch_now.get(key)
    else:
        option, was, asked = PLAN_OPTIONS[key], before.get(key), now.get(key)
    if key == "header":
        made = f"its CSV read {'with' if was else 'without'} a header row ({opt('header')})"
    elif key == "weights":
        made = f"{opt(option)} {_weights_shown(was)}, not {_weights_shown(asked)}"
    else:
        made = f"{opt(option)} {_value_shown(was)}, not {_value_shown(asked)}"
    raise PlanMismatch(
        f"{where} was made with {made}; leave out {opt(option)} to go on as it was made, "
        f"or {start_over}",
        option,
    )


def _csv_change(before: dict, now: dict) -> str:
    if before.get("rows") != now.get("rows"):
        return f"{before.get('rows')} rows then, {now.get('rows')} now"
    if before.get("csv_bytes") != now.get("csv_bytes"):
        return f"{before.get('csv_bytes')} bytes then, {now.get('csv_bytes')} now"
    return "modified since"


def _weights_shown(value: Any) -> str:
    text = str(value)
    return f"sha256 {text[:12]}" if len(text) == 64 and text.isalnum() else repr(text)


def _value_shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else repr(value)


def is_complete(store: str | os.PathLike, name: str) -> bool:
    """True when `store/name` is a sealed source."""
    return (store_path(store) / check_name(name) / META).is_file()


def _remove_source(path: Location) -> None:
    """Delete a source for --overwrite; refuse anything that is not one (or an empty folder)."""
    if not _is_source(path):
        raise _not_a_source(path)
    _remove_tree(path)


def _is_source(path: Location) -> bool:
    """A folder that holds a source, complete or not, or nothing at all."""
    return (
        path.is_dir()
        and not path.is_symlink()
        and ((path / PLAN).is_file() or (path / META).is_file() or not any(path.iterdir()))
    )


def _not_a_source(path: Location) -> StoreError:
    return StoreError(
        f"{path} is not an imgsim source (no {PLAN} or {META}), so neither "
        f"{opt('resume')} nor {opt('overwrite')} touches it: move it away or pick "
        f"another {opt('name')}"
    )


def _dumps(document: dict) -> str:
    return json.dumps(document, indent=2, default=str)
