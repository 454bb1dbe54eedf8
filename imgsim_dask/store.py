"""Store: one extracted source on disk, `STORE/NAME/`, and its HDF5 export.

    features.zarr   rows x dim float32, row i <-> row i of the row table, NaN rows for failures
    rows.parquet/   one part file per partition: kept CSV fields, `row`, status columns
    plan.json       what the extraction was started with (rows, model, weights, CSV...);
                    `--resume` continues only an extraction with the same plan
    meta.json       model, weights, dim, counts, timings, versions; written last, so a store
                    without it is incomplete

Only the driver writes (one writer, chunk-aligned, part files renamed into place), so
workers need no shared filesystem and no two writers ever touch one Zarr chunk. A
partition is done once its part file exists (it is renamed into place after its Zarr
chunk is written), which is what `--resume` relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from .errors import StoreError
from .fetch import OK

FEATURES = "features.zarr"
ROWS = "rows.parquet"
META = "meta.json"
PLAN = "plan.json"
DEFAULT_STORE = "imgsim-store"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class FeatureStore:
    """A complete extracted source: features, row table and metadata."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

    @property
    def features(self) -> zarr.Array:
        """The rows x dim float32 feature array (lazy, on disk)."""
        return zarr.open_array(self.path / FEATURES, mode="r")

    def rows(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The row table, sorted by row id."""
        table = pd.read_parquet(self.path / ROWS, columns=columns)
        return table.sort_values("row", ignore_index=True) if "row" in table else table

    def status_counts(self) -> dict[str, int]:
        counts = self.rows(["status"])["status"].value_counts()
        return {str(k): int(v) for k, v in counts.items()}

    def export_h5(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the original's layout: HDF5 dataset `data` (ok rows, row order) + a TSV of fields."""
        import h5py

        target = Path(path)
        if not target.parent.is_dir():
            raise StoreError(f"cannot write {target}: directory {target.parent} does not exist")
        rows = self.rows()
        ok = rows["status"] == OK
        features = self.features[:][ok.to_numpy()]
        fields_path = target.with_name(f"{target.stem}_fields.csv")
        fields = rows.loc[ok, list(self.meta["fields"])]

        def write_h5(tmp: str) -> None:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("data", data=features)
                h5.attrs["model"] = self.meta["model"]
                h5.attrs["rows"] = rows.loc[ok, "row"].to_numpy()

        atomic_write(target, write_h5)
        atomic_write(fields_path, lambda tmp: fields.to_csv(tmp, sep="\t", index=False))
        return target, fields_path


def open_store(store: str | os.PathLike, name: str) -> FeatureStore:
    """Open a complete source by name, or raise a one-line `StoreError`."""
    path = Path(store) / name
    if not path.is_dir():
        known = sorted(p.name for p in Path(store).iterdir() if (p / META).is_file()) \
            if Path(store).is_dir() else []
        hint = f" (known: {', '.join(known)})" if known else ""
        raise StoreError(f"no source named {name!r} in store {store}{hint}")
    if not (path / META).is_file():
        raise StoreError(f"source {name!r} in {store} is incomplete (the extraction did not "
                         "finish); continue it with --resume, or start over with --overwrite")
    return FeatureStore(path)


class StoreWriter:
    """Creates (or resumes) a source, writes it one partition at a time, seals it with meta.json.

    `plan` describes the extraction (row count, dim, partition size, model, weights, CSV);
    with `resume=True` an incomplete source started with the same plan is continued:
    `done` holds the partitions already written, which the caller skips (`complete` is
    set when there is nothing left to do).
    """

    def __init__(self, store: str | os.PathLike, name: str, plan: dict,
                 overwrite: bool = False, resume: bool = False):
        if not name or name != Path(name).name or name.startswith("."):
            raise StoreError(f"invalid source name {name!r}: use a plain name like 'books'")
        self.path = Path(store) / name
        self.chunk_rows = int(plan["partition_rows"])
        self.done: set[int] = set()
        self.complete = False
        if resume and (self.path / PLAN).is_file():
            self._reopen(plan)
            return
        if resume and self.path.exists():
            raise StoreError(f"cannot resume {name!r} in {store}: it has no {PLAN} (not an "
                             "extraction of this version); pass --overwrite to start over")
        if self.path.exists():
            if not (overwrite or resume):
                raise StoreError(f"source {name!r} already exists in {store}; "
                                 "pass --overwrite to replace it")
            shutil.rmtree(self.path)
        try:
            (self.path / ROWS).mkdir(parents=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        n_rows, dim = int(plan["rows"]), int(plan["dim"])
        self.features = zarr.create_array(
            self.path / FEATURES, shape=(n_rows, dim),
            chunks=(max(1, min(self.chunk_rows, n_rows)), dim), dtype="float32",
            fill_value=np.nan,
        )
        atomic_write(self.path / PLAN, lambda tmp: Path(tmp).write_text(_dumps(plan)))

    def _reopen(self, plan: dict) -> None:
        """Continue an interrupted extraction, if it was started with the same plan."""
        before = json.loads((self.path / PLAN).read_text())
        changed = [key for key in sorted(set(before) | set(plan)) if before.get(key) != plan.get(key)]
        if changed:
            key = changed[0]
            raise StoreError(f"cannot resume {self.path.name!r}: {key} was {before.get(key)!r}, "
                             f"now {plan.get(key)!r}; pass --overwrite to start over")
        self.complete = (self.path / META).is_file()
        if not self.complete:
            for stray in (self.path / ROWS).glob(".*"):  # temporary files of an interrupted write
                stray.unlink()
        self.features = zarr.open_array(self.path / FEATURES, mode="r+")
        self.done = {int(part.stem.split("-")[1]) for part in (self.path / ROWS).glob("part-*.parquet")}

    def reopen(self, partitions: set[int]) -> None:
        """Mark a complete source's `partitions` to be written again (e.g. to retry failures)."""
        (self.path / META).unlink(missing_ok=True)  # incomplete until sealed again
        for index in partitions:
            (self.path / ROWS / f"part-{index:05d}.parquet").unlink(missing_ok=True)
        self.done -= partitions
        self.complete = False

    def done_statuses(self) -> pd.DataFrame:
        """The `status` column of the partitions already written (empty for a fresh source)."""
        parts = [self.path / ROWS / f"part-{index:05d}.parquet" for index in sorted(self.done)]
        return pd.concat([pd.read_parquet(p, columns=["status"]) for p in parts]) if parts \
            else pd.DataFrame({"status": []})

    def write_partition(self, index: int, features: np.ndarray, rows: pd.DataFrame) -> None:
        """Write partition `index` (rows [index*chunk_rows, ...)): one Zarr chunk, then its part file."""
        start = index * self.chunk_rows
        try:
            self.features[start:start + len(features)] = features
            part = self.path / ROWS / f"part-{index:05d}.parquet"
            atomic_write(part, lambda tmp: rows.to_parquet(tmp, index=False))
        except OSError as exc:
            raise StoreError(f"cannot write partition {index} to {self.path}: "
                             f"{exc.strerror or exc}; fix it, then continue with --resume") from None
        self.done.add(index)

    def finish(self, meta: dict) -> FeatureStore:
        """Seal the source: after this it opens as complete."""
        atomic_write(self.path / META, lambda tmp: Path(tmp).write_text(_dumps(meta)))
        return FeatureStore(self.path)


def _dumps(document: dict) -> str:
    return json.dumps(document, indent=2, default=str)
