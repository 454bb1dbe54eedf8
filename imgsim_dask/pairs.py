"""Pairs: match two stored sources (or one against itself) and write the result table.

Validates everything the user can get wrong before any scoring starts (names, stores of
different models, threshold range, output path), then runs the engine (`match`) one of two
ways:

- into one table here (no `--out`, or a `.parquet`/`.csv` file): the pairs come back to
  this process, which joins the fields of both rows, and stops with a one-line error when
  they would not fit in its memory;
- into a Parquet dataset (`--out DIR/`, a local or fsspec directory): each block's merge
  task joins the fields on its worker and writes `part-NNNNN.parquet`; this process gets
  counts and the best few pairs, then writes `_imgsim.json` (what was matched, how; last,
  so a dataset without it is incomplete) and, for a self match, `_groups.parquet`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from .cluster import Cluster, connect, starts_a_plain_local_cluster
from .descriptor import IMPORTED
from .errors import InputError, StoreError
from .match import GroupForest, connected_groups, match_features, pairs_frame
from .match.engine import prepared, scored_blocks
from .match.kernel import Pairs, concat_pairs, dedupe, merge_top_k
from .options import DEFAULT_STORE, MatchOptions, OptionError, opt, with_overrides
from .schema import OK, SourceMeta
from .store import (
    PLAN,
    Location,
    PartitionStore,
    Source,
    atomic_write,
    check_store,
    is_local,
    open_source,
    read_parquet,
    store_path,
)

PAIRS_RECORD = b"imgsim"  # a pairs .parquet file's metadata key: what `_about` says
DATASET_RECORD = "_imgsim.json"  # written last: a pairs dataset without it is incomplete
GROUPS = "_groups.parquet"  # beside the parts, not read as one of them
PREVIEW_ROWS = 10  # pairs a dataset run brings back to show
TALLEST_BLOCK = 16  # --new-only: old rows per block against few new ones, in block_rows
IN_PROCESS_CELLS = 10**8  # rows x rows up to which a plain local run scores here, without a cluster
DRIVER_MEMORY_SHARE = 0.25  # of the memory available when a run starts, for a table held here


@dataclass
class MatchResult:
    """The pairs table, how it was decided, and what a summary needs."""

    pairs: pd.DataFrame  # all of them, or (written to a dataset) the most similar few
    name1: str
    name2: str
    rows1_matched: int
    rows2_matched: int
    seconds: float
    path: Location | None = None
    threshold: float | None = None
    threshold_from: str = ""  # "given", "the default of MODEL, DESCRIPTOR", a calibration
    top_k: int | None = None
    rows1_ok: int = 0  # rows with features, of each side
    rows2_ok: int = 0
    preview: list[str] = field(default_factory=list)  # the columns a person reads first
    pair_count: int = -1  # -1: len(pairs); after --new-only, the pairs it added
    group_count: int | None = None  # of a self match: -1, the groups in `pairs`
    total_pairs: int | None = None  # after --new-only, the dataset's pairs in all
    about: dict = field(default_factory=dict)  # what the pairs file records (`_about`)

    def __post_init__(self) -> None:
        if self.pair_count < 0:
            self.pair_count = len(self.pairs)
        if self.group_count is not None and self.group_count < 0:
            self.group_count = int(self.pairs["group"].nunique())

    @property
    def self_match(self) -> bool:
        return self.group_count is not None

    @property
    def complete(self) -> bool:
        """Whether `pairs` holds every pair (not only a dataset's preview)."""
        return len(self.pairs) == self.pair_count

    def summary(self) -> str:
        where = f" -> {self.path}" if self.path else ""
        matched = f"{self.rows1_matched} of {self.rows1_ok} rows of {self.name1}"
        groups = ""
        if self.group_count is not None:  # rows1_matched counts both sides of pairs
            count = self.group_count
            groups = f"; {count} groups, {self.rows1_matched - count} rows are extra copies"
        else:
            matched += f" and {self.rows2_matched} of {self.rows2_ok} rows of {self.name2}"
        if self.total_pairs is not None:  # --new-only: counts of what it added
            return (
                f"{self.pair_count} pairs added ({self.total_pairs} in all); {matched} "
                f"matched in them{groups}; {self.seconds:.1f} s{where}"
            )
        return f"{self.pair_count} pairs; {matched} matched{groups}; {self.seconds:.1f} s{where}"

    def decision(self) -> str:
        """How pairs were kept: the threshold that applied and where it came from."""
        best = f"the {self.top_k} best per row of {self.name1}" if self.top_k else ""
        if self.threshold is None:
            return f"kept {best}, however far (no threshold)"
        kept = f"kept pairs with similarity >= {self.threshold:g} ({self.threshold_from})"
        return f"{kept}, at most {best}" if best else kept


def is_dataset(out: str | os.PathLike) -> bool:
    """Whether `--out` names a Parquet dataset (a directory: existing, ending in `/`, or an
    fsspec URL) rather than one file."""
    text = os.fspath(out)
    return "://" in text or text.endswith(("/", os.sep)) or Path(text).is_dir()


def check_output(out: str | os.PathLike, inputs: tuple[str, ...] = ()) -> Location:
    """Where a match's pairs go: a directory for a Parquet dataset (`is_dataset`: new, empty,
    or an earlier pairs dataset to replace), else one file (`check_output_file`)."""
    if is_dataset(out):
        return _check_dataset_path(out)
    return check_output_file(out, inputs, dataset_too=True)


def check_output_file(
    out: str | os.PathLike, inputs: tuple[str, ...] = (), *, dataset_too: bool = False
) -> Path:
    """The output file if its format is known, it can be written and it is none of `inputs`
    (the sources' CSVs), else a one-line error."""
    path = Path(out)
    if path.suffix not in (".csv", ".parquet"):
        also = ", or a directory for a Parquet dataset (DIR/)" if dataset_too else ""
        raise OptionError(f"{opt('out')} {out}: use a .csv or .parquet file{also}")
    _check_writable_dir(out, path.parent)
    if path.is_file() and any(
        path.resolve() == Path(csv).resolve() for csv in inputs if csv and "://" not in csv
    ):
        raise OptionError(
            f"{opt('out')} {out} is the CSV a source was extracted from; pick another file"
        )
    return path


def _check_writable_dir(out: str | os.PathLike, parent: Path) -> None:
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OptionError(f"{opt('out')} {out}: {parent} {what}")
    try:  # what write access really means here (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OptionError(
            f"{opt('out')} {out}: cannot write in {parent}: {exc.strerror or exc}"
        ) from None


def _check_dataset_path(out: str | os.PathLike) -> Location:
    text = os.fspath(out)
    try:
        path: Location = store_path(text.rstrip("/") or text)
        if is_local(path):
            local = Path(os.path.abspath(str(path)))
            _check_writable_dir(out, local if local.is_dir() else local.parent)
            path = local
        exists = path.exists()
        if exists and not path.is_dir():
            raise OptionError(f"{opt('out')} {out} is a file, not a directory")
        others = [p.name for p in path.iterdir()] if exists else []
    except (OSError, ValueError, ImportError) as exc:
        raise OptionError(f"{opt('out')} {out}: {exc}".split("\n")[0]) from None
    if others and DATASET_RECORD not in others:
        raise OptionError(
            f"{opt('out')} {out} is a directory with other files in it; name a new or empty "
            f"directory for the pairs dataset"
        )
    return path


def match_sources(
    name1: str,
    name2: str | None = None,
    store: str = DEFAULT_STORE,
    *,
    out: str | os.PathLike | None = None,
    cluster: Cluster = None,
    options: MatchOptions | None = None,
    **fields: Any,
) -> MatchResult:
    """Match `name1` against `name2` (itself when None or equal) and optionally write `out`.

    Without a threshold, the model's recommended threshold applies, except to `top_k`
    between two sources (each row's best matches, however far). `cluster`: where it runs
    (see `cluster.connect`). Keyword arguments named like `MatchOptions` fields
    (`threshold=`, `top_k=`, ...) override `options`.
    """
    (options,) = with_overrides(fields, options or MatchOptions())
    check_store(store)
    first = open_source(store, name1)
    second = first if name2 in (None, name1) else open_source(store, name2)
    self_match = second is first
    _check_compatible(first, second)
    threshold_from = "given"
    if options.threshold is None and (options.top_k is None or self_match):
        # a pair within one source claims a near-duplicate
        threshold, threshold_from = default_threshold(first)
        if threshold is None:
            raise OptionError(
                f"{first.name} has no default threshold ({threshold_from}): pass "
                f"{opt('threshold')}, run imgsim calibrate {first.name} --save, or "
                f"{opt('top_k')} between two sources"
            )
        options = replace(options, threshold=threshold)
    inputs = (first.meta.csv, second.meta.csv)
    path = check_output(out, inputs) if out is not None else None
    prefixes = _prefixes(first, second, self_match)
    common: dict[str, Any] = dict(
        name1=first.name,
        name2=second.name,
        threshold=options.threshold,
        threshold_from=threshold_from,
        top_k=options.top_k,
        rows1_ok=first.meta.status_counts.get(OK, 0),
        rows2_ok=second.meta.status_counts.get(OK, 0),
        preview=_preview(first, second, prefixes),
        about=_about(first, second, options, threshold_from),
    )
    dataset = path is not None and out is not None and is_dataset(out)
    if options.new_only and not dataset:
        raise OptionError(
            f"{opt('new_only')} adds to the Parquet dataset of an earlier run: give "
            f"{opt('out')} DIR/"
        )
    if dataset:
        assert path is not None
        if self_match and options.top_k is not None:
            raise OptionError(
                f"{opt('top_k')} within one source gives each pair once only in one table: "
                f"{opt('out')} FILE.parquet, or {opt('threshold')} alone for a dataset"
            )
        earlier = _earlier_run(path, first, second, options) if options.new_only else None
        started = time.perf_counter()
        with connect(cluster) as active:
            written = _write_dataset(
                first, second, options, active, prefixes, path, earlier,
                about=common["about"],
            )  # fmt: skip
        return MatchResult(**written, **common, seconds=time.perf_counter() - started, path=path)

    started = time.perf_counter()
    with ExitStack() as stack:
        small = first.meta.rows * second.meta.rows <= IN_PROCESS_CELLS
        here = small and starts_a_plain_local_cluster(cluster)  # not worth its start-up
        found = match_features(
            first.features if here else first.on_workers,
            second.features if here else second.on_workers,
            options,
            client=None if here else stack.enter_context(connect(cluster)),
            self_match=self_match,
            max_held=_pairs_that_fit(first, second),
            too_many=f"; write a Parquet dataset instead: {opt('out')} DIR/",
        )
    table = _with_fields(found, first, second, prefixes)
    if self_match:  # a row of the one source matched whichever side of a pair it is on
        matched = pd.unique(found[["row_a", "row_b"]].to_numpy().ravel())
        counts = (len(matched), len(matched))
    else:
        counts = (found["row_a"].nunique(), found["row_b"].nunique())
    result = MatchResult(
        table,
        rows1_matched=int(counts[0]),
        rows2_matched=int(counts[1]),
        seconds=time.perf_counter() - started,
        group_count=-1 if self_match else None,
        **common,
    )
    if path is not None:
        result.path = write_table(table, Path(str(path)), about=result.about)
    return result


def _about(first: Source, second: Source, options: MatchOptions, threshold_from: str) -> dict:
    """What a pairs file records of its making (`PAIRS_RECORD`), so that `imgsim review`
    needs only the file: where the sources are, and how pairs were kept."""
    store = first.path.parent
    return {
        "store": str(Path(str(store)).absolute()) if is_local(store) else str(store),
        "sources": [first.name, second.name],
        "threshold": options.threshold,
        "threshold_from": threshold_from,
        "top_k": options.top_k,
        "self_match": second is first,
        "prefixes": list(_prefixes(first, second, second is first)),
    }


def _pairs_that_fit(first: Source, second: Source) -> int:
    """How many pairs a table held here may have: a share of the memory available now, at
    a generous guess of each pair's bytes once both rows' fields are joined."""
    per_pair = 24 + 100 * (len(first.meta.fields) + len(second.meta.fields))
    return int(psutil.virtual_memory().available * DRIVER_MEMORY_SHARE / per_pair)


@dataclass(frozen=True)
class PartCounts:
    """What a worker reports of the part it wrote."""

    name: str
    pairs: int
    rows_a: np.ndarray  # distinct rows of each side in the part (self: of both sides)
    rows_b: np.ndarray
    best: pd.DataFrame  # its most similar pairs, with fields


@dataclass(frozen=True)
class PairsDataset:
    """Where the workers write a match's pairs: a part per block of A (`names[block]`),
    each pair with the fields of both rows; with `merge`, each row's top k of the part
    there and the new pairs. Small, so it travels in the tasks."""

    url: str
    storage_options: dict
    first: PartitionStore
    second: PartitionStore
    fields: tuple[tuple[str, ...], tuple[str, ...]]
    prefixes: tuple[str, str]
    self_match: bool
    run: str
    names: tuple[str, ...] = ()
    merge: int | None = None  # top k to keep of the part already there and the new pairs

    @property
    def path(self) -> UPath:
        return UPath(self.url, **self.storage_options)

    def write(self, block: int, pairs: Pairs) -> PartCounts:
        """Write block `block`'s part (where the block was merged) and count it."""
        part = self.path / self.names[block]
        if self.merge is not None:
            stored = read_parquet(part, columns=["row_a", "row_b", "similarity"])
            old = tuple(stored[c].to_numpy() for c in ("row_a", "row_b", "similarity"))
            pairs = merge_top_k([dedupe(*concat_pairs([old, pairs]))], self.merge)
        found = pairs_frame(*pairs)
        left = self.first.fields(found["row_a"].to_numpy(), list(self.fields[0]), self.run)
        right = self.second.fields(found["row_b"].to_numpy(), list(self.fields[1]), self.run)
        table = _joined(found, left, right, self.prefixes)
        try:
            atomic_write(part, lambda tmp: table.to_parquet(tmp, index=False))
        except OSError as exc:
            raise StoreError(f"cannot write {part}: {exc.strerror or exc}") from None
        rows_a, rows_b = found["row_a"].to_numpy(), found["row_b"].to_numpy()
        if self.self_match:
            rows_a = rows_b = np.concatenate([rows_a, rows_b])
        return PartCounts(
            part.name,
            len(table),
            np.unique(rows_a),
            np.unique(rows_b),
            table.nlargest(PREVIEW_ROWS, "similarity", keep="first"),
        )


def _write_dataset(
    first: Source,
    second: Source,
    options: MatchOptions,
    client: Any,
    prefixes: tuple[str, str],
    path: Location,
    earlier: dict | None = None,
    about: dict | None = None,
) -> dict[str, Any]:
    """Match into the Parquet dataset at `path` (blocks' parts written where they were
    merged): the pair and row counts, the best pairs and, for a self match, the groups.
    With the `earlier` run's record (`_earlier_run`), only the blocks with rows added to
    either source since then, into the same dataset."""
    self_match = second is first
    a, b = first.on_workers, second.on_workers
    given = options  # what the record keeps, for the next run to compare with
    options, b = prepared(a, b, options, self_match)
    n, m = first.meta.rows, second.meta.rows
    if earlier is None:
        _empty_dataset(path)
        earlier = {"rows": [0, 0], "parts": []}
    else:
        (path / DATASET_RECORD).unlink()  # incomplete until this run's record is written
    (n0, m0), parts = earlier["rows"], list(earlier["parts"])
    generation = 1 + max((int(p["name"].split("-")[1]) for p in parts), default=-1)
    remote = path if not is_local(path) else None
    sink = PairsDataset(
        str(path),
        dict(getattr(remote, "storage_options", {}) or {}),
        a.store,
        b.store,
        (tuple(first.meta.fields), tuple(second.meta.fields)),
        prefixes,
        self_match,
        uuid.uuid4().hex[:8],
    )
    new_blocks = [(s, min(s + options.block_rows, n)) for s in range(n0, n, options.block_rows)]
    if options.top_k is not None:  # each earlier part takes its rows' new candidates
        old_blocks = [tuple(p["rows"]) for p in parts]
    else:  # new parts: blocks as tall as the few new rows of B allow, in the same memory
        added_b = max(1, (n if self_match else m) - (n0 if self_match else m0))
        tall = options.block_rows * options.slice_rows // added_b
        size = min(max(options.block_rows, tall), TALLEST_BLOCK * options.block_rows)
        old_blocks = [(s, min(s + size, n0)) for s in range(0, n0, size)]
    # each run: (A blocks, first row of B, whether old parts take the pairs)
    runs = [(new_blocks, 0, False), (old_blocks, m0, options.top_k is not None)]
    if self_match:  # a new pair has its larger row among the new ones
        runs = [(old_blocks + new_blocks, n0, False)]
    matched = np.zeros(n, dtype=bool), np.zeros(m, dtype=bool)
    added, best = 0, pd.DataFrame()
    counted = {p["name"]: p for p in parts}
    made = 0  # new parts of this generation so far
    for blocks, b_start, merge in runs:
        names = (
            [p["name"] for p in parts]
            if merge
            else [f"part-{generation:03d}-{made + i:05d}.parquet" for i in range(len(blocks))]
        )
        made += 0 if merge else len(blocks)
        run_sink = replace(sink, names=tuple(names), merge=options.top_k if merge else None)
        for i, counts in scored_blocks(
            a, b, options, client=client, self_match=self_match, finish=run_sink.write,
            a_blocks=blocks, b_start=b_start,
        ):  # fmt: skip
            before = counted.get(counts.name, {}).get("pairs", 0)
            counted[counts.name] = {"name": counts.name, "rows": list(blocks[i]),
                                    "pairs": counts.pairs}  # fmt: skip
            added += counts.pairs - before
            matched[0][counts.rows_a] = True
            matched[1][counts.rows_b] = True
            best = pd.concat([best, counts.best]).nlargest(PREVIEW_ROWS, "similarity")
    total = sum(p["pairs"] for p in counted.values())
    groups = None
    if self_match:
        groups = _write_groups(path, list(counted.values()))
        if len(best):
            best["group"] = groups.reindex(best["row_a"]).to_numpy()
    record = {
        "format": 1,
        "store": str(first.path.parent),
        "sources": [first.name, second.name],
        "plans": [_plan_hash(first), _plan_hash(second)],
        "threshold": given.threshold,
        "top_k": given.top_k,
        "block_rows": options.block_rows,
        "rows": [n, m],
        "pairs": total,
        "parts": sorted(counted.values(), key=lambda p: p["name"]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "about": about or {},
    }
    atomic_write(path / DATASET_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record)))
    return dict(
        pairs=best.sort_values("similarity", ascending=False, ignore_index=True),
        rows1_matched=int(matched[0].sum()),
        rows2_matched=int(matched[1].sum()),
        pair_count=added,
        total_pairs=total if given.new_only else None,
        group_count=None if groups is None else int(groups.nunique()),
    )


def _plan_hash(source: Source) -> str:
    """What identifies a source across appends: its plan.json (an append keeps it; making
    the source anew writes another)."""
    return hashlib.sha256((source.path / PLAN).read_bytes()).hexdigest()[:16]


def _earlier_run(
    path: Location, first: Source, second: Source, options: MatchOptions
) -> dict | None:
    """The record of the dataset's last run, if `--new-only` can add to it: the same
    sources (grown or not) and options; None where there is none yet."""
    if not (path / DATASET_RECORD).exists():
        if path.exists() and any(path.iterdir()):
            raise OptionError(
                f"{opt('out')} {path} has no complete earlier run to add to (it was "
                f"interrupted?); match again without {opt('new_only')}"
            )
        return None
    record = json.loads((path / DATASET_RECORD).read_text())
    if record.get("sources") != [first.name, second.name] or record.get("plans") != [
        _plan_hash(first),
        _plan_hash(second),
    ]:
        raise OptionError(
            f"{opt('out')} {path} holds a match of {' and '.join(record.get('sources', []))} "
            f"as they were then; {opt('new_only')} adds to the same sources only (made "
            f"anew since? match again without {opt('new_only')})"
        )
    for key, value in (("threshold", options.threshold), ("top_k", options.top_k)):
        if record.get(key) != value:
            raise OptionError(
                f"{opt('out')} {path} was matched with {opt(key)} {record.get(key)}, not "
                f"{value}; {opt('new_only')} needs the same"
            )
    if record["rows"][0] > first.meta.rows or record["rows"][1] > second.meta.rows:
        raise OptionError(f"{opt('out')} {path} was matched with more rows than the sources have")
    return record


def _empty_dataset(path: Location) -> None:
    """A new directory, or an earlier pairs dataset's emptied (record first: incomplete)."""
    if path.exists():
        (path / DATASET_RECORD).unlink(missing_ok=True)
        for old in path.iterdir():
            old.unlink()
    elif is_local(path):
        Path(str(path)).mkdir()


def _write_groups(path: Location, parts: list[dict]) -> pd.Series:
    """`_groups.parquet`: the near-duplicate group of every row in a pair (the smallest row id
    of its connected component), from the dataset's row columns read back part by part into
    a `GroupForest`, so this process never holds all the pairs."""
    forest = GroupForest()
    for part in parts:
        if part["pairs"]:
            found = read_parquet(path / part["name"], columns=["row_a", "row_b"])
            forest.add(found["row_a"].to_numpy(), found["row_b"].to_numpy())
    groups = forest.groups()
    atomic_write(path / GROUPS, lambda tmp: groups.reset_index().to_parquet(tmp, index=False))
    return groups


def default_threshold(source: Source) -> tuple[float | None, str]:
    """The threshold a match of `source` takes when none is given, and where it comes from:
    its saved calibration, else the model's measured threshold for its descriptor."""
    meta = source.meta
    if meta.calibration:
        return float(meta.calibration["threshold"]), f"imgsim calibrate of {source.name}"
    if meta.threshold is None:
        reason = "its vectors were imported" if meta.descriptor == IMPORTED else (
            f"none was measured for {meta.model} with descriptor {meta.descriptor} at "
            f"{meta.image_size} px"
        )  # fmt: skip
        return None, reason
    if meta.descriptor == IMPORTED:
        return meta.threshold, f"the default of {meta.model}"  # given to `imgsim import`
    return meta.threshold, f"the default of {meta.model}, {meta.descriptor.split('/')[0]}"


def _check_compatible(first: Source, second: Source) -> None:
    a, b = first.meta, second.meta
    if (a.model, a.dim) != (b.model, b.dim):
        raise InputError(
            f"cannot match {first.name} ({a.model}, {a.dim}-d) with "
            f"{second.name} ({b.model}, {b.dim}-d): extract both with one model"
        )
    if a.descriptor != b.descriptor:
        raise InputError(
            f"cannot match {first.name} (descriptor {a.descriptor}) with {second.name} "
            f"(descriptor {b.descriptor}): extract one again with {opt('descriptor')} "
            f"{b.descriptor.split('/')[0]} (or the other with {a.descriptor.split('/')[0]}) "
            f"and {opt('overwrite')}"
        )
    if a.image_size != b.image_size:
        raise InputError(
            f"cannot match {first.name} ({a.image_size} px model input) with {second.name} "
            f"({b.image_size} px): extract one again with {opt('image_size')} {b.image_size} "
            f"(or the other with {a.image_size}) and {opt('overwrite')}"
        )
    # where a side has no hash (random weights, or package weights stored before they had
    # one), the descriptions decide
    hashes = a.weights_sha256 or "", b.weights_sha256 or ""
    if not (hashes[0] == hashes[1] if all(hashes) else a.weights == b.weights):

        def described(meta: SourceMeta, sha256: str) -> str:
            return f"{meta.weights}, sha256 {sha256[:12]}" if sha256 else meta.weights

        raise InputError(
            f"cannot match {first.name} (weights: {described(a, hashes[0])}) with "
            f"{second.name} (weights: {described(b, hashes[1])}): features of "
            f"different weights are not comparable; extract both with the same {opt('weights')}"
        )


def _prefixes(first: Source, second: Source, self_match: bool) -> tuple[str, str]:
    """The column prefixes of both sides' fields, or a one-line error if two columns collide."""
    prefix1, prefix2 = (
        (f"{first.name}_a_", f"{first.name}_b_")
        if self_match
        else (f"{first.name}_", f"{second.name}_")
    )
    columns = [
        "row_a",
        "row_b",
        *(prefix1 + f for f in first.meta.fields),
        *(prefix2 + f for f in second.meta.fields),
        "similarity",
    ]
    if self_match:
        columns.append("group")
    clashes = sorted({c for c in columns if columns.count(c) > 1})
    if clashes:
        raise InputError(
            f"the result would have two columns named {', '.join(clashes)} "
            f"(source names {first.name!r} and {second.name!r} plus their fields); "
            f"rename a source's directory in the store (e.g. {first.name} -> "
            f"{first.name}1) and match again"
        )
    return prefix1, prefix2


def _preview(first: Source, second: Source, prefixes: tuple[str, str]) -> list[str]:
    """Per side its id column and up to two other fields (the URL only if there is no
    other), then the similarity (and the group of a self-match)."""
    columns = []
    for source, prefix in ((first, prefixes[0]), (second, prefixes[1])):
        meta = source.meta
        others = [f for f in meta.fields if f not in (meta.id_col, meta.url_col)][:2]
        url = [meta.url_col] if meta.url_col in meta.fields else []
        columns += [prefix + f for f in [meta.id_col, *(others or url)]]
    return [*dict.fromkeys(columns), "similarity", *(["group"] if second is first else [])]


def _with_fields(
    found: pd.DataFrame, first: Source, second: Source, prefixes: tuple[str, str]
) -> pd.DataFrame:
    """The pairs with every kept field of both rows, `NAME1_<field>` and `NAME2_<field>`."""
    self_match = second is first
    fields1 = first.rows(["row", *first.meta.fields]).set_index("row")
    fields2 = fields1 if self_match else second.rows(["row", *second.meta.fields]).set_index("row")
    table = _joined(
        found,
        fields1.loc[found["row_a"].to_numpy()],
        fields2.loc[found["row_b"].to_numpy()],
        prefixes,
    )
    if self_match:
        groups = connected_groups(
            found["row_a"].to_numpy(), found["row_b"].to_numpy(), first.meta.rows
        )
        table["group"] = groups[found["row_a"].to_numpy()].astype(np.int64)
    return table


def _joined(
    found: pd.DataFrame, left: pd.DataFrame, right: pd.DataFrame, prefixes: tuple[str, str]
) -> pd.DataFrame:
    """`row_a`, `row_b`, the fields of both rows (`left`, `right`: one row per pair), then
    `similarity`."""
    return pd.concat(
        [
            found[["row_a", "row_b"]].reset_index(drop=True),
            left.add_prefix(prefixes[0]).reset_index(drop=True),
            right.add_prefix(prefixes[1]).reset_index(drop=True),
            found[["similarity"]].reset_index(drop=True),
        ],
        axis=1,
    )


def write_table(table: pd.DataFrame, path: Path, about: dict | None = None) -> Path:
    """Write Parquet or CSV (by suffix), atomically; `about` goes in a Parquet file's
    metadata (`PAIRS_RECORD`, JSON)."""

    def parquet(tmp: str) -> None:
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        if about is not None:
            metadata = {**(arrow.schema.metadata or {}), PAIRS_RECORD: json.dumps(about)}
            arrow = arrow.replace_schema_metadata(metadata)
        pq.write_table(arrow, tmp)

    try:
        if path.suffix == ".csv":
            atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
        else:
            atomic_write(path, parquet)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
