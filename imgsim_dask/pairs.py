"""Pairs: match two stored sources (or one against itself) and write the result table.

Validates everything the user can get wrong before any scoring starts (names, stores of
different models, threshold range, output path), runs the engine in `match.py`, then
joins the fields of both rows to every pair.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cluster import Cluster, connect
from .errors import InputError, StoreError
from .match import connected_groups, match_features
from .options import DEFAULT_STORE, MatchOptions, OptionError, opt, with_overrides
from .schema import OK, SourceMeta
from .store import Source, atomic_write, check_store, open_source


@dataclass
class MatchResult:
    """The pairs table, how it was decided, and what a summary needs."""

    pairs: pd.DataFrame
    name1: str
    name2: str
    rows1_matched: int
    rows2_matched: int
    seconds: float
    path: Path | None = None
    threshold: float | None = None
    threshold_from: str = ""  # "given", or "the default of MODEL"
    top_k: int | None = None
    rows1_ok: int = 0  # rows with features, of each side
    rows2_ok: int = 0
    preview: list[str] = field(default_factory=list)  # the columns a person reads first

    @property
    def self_match(self) -> bool:
        return "group" in self.pairs

    def summary(self) -> str:
        where = f" -> {self.path}" if self.path else ""
        matched = f"{self.rows1_matched} of {self.rows1_ok} rows of {self.name1}"
        groups = ""
        if self.self_match:  # rows1_matched counts both sides of pairs
            count = self.pairs["group"].nunique()
            groups = f"; {count} groups, {self.rows1_matched - count} rows are extra copies"
        else:
            matched += f" and {self.rows2_matched} of {self.rows2_ok} rows of {self.name2}"
        return f"{len(self.pairs)} pairs; {matched} matched{groups}; {self.seconds:.1f} s{where}"

    def decision(self) -> str:
        """How pairs were kept: the threshold that applied and where it came from."""
        best = f"the {self.top_k} best per row of {self.name1}" if self.top_k else ""
        if self.threshold is None:
            return f"kept {best}, however far (no threshold)"
        kept = f"kept pairs with similarity >= {self.threshold:g} ({self.threshold_from})"
        return f"{kept}, at most {best}" if best else kept


def check_output_path(out: str | os.PathLike, inputs: tuple[str, ...] = ()) -> Path:
    """The output path if its format is known, its directory takes a file and it is none of
    `inputs` (the sources' CSVs), else a one-line error."""
    path = Path(out)
    if path.suffix not in (".csv", ".parquet") and not path.is_dir():
        raise OptionError(
            f"{opt('out')} {out}: use a .csv or .parquet file, or an existing directory"
        )
    parent = path if path.is_dir() else path.parent
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
    if path.is_file() and any(
        path.resolve() == Path(csv).resolve() for csv in inputs if csv and "://" not in csv
    ):
        raise OptionError(
            f"{opt('out')} {out} is the CSV a source was extracted from; pick another file"
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
        if first.meta.threshold is None:
            raise OptionError(
                f"{first.name} has no default threshold (its vectors were imported): pass "
                f"{opt('threshold')}, or {opt('top_k')} between two sources"
            )
        options = replace(options, threshold=first.meta.threshold)
        threshold_from = f"the default of {first.meta.model}"
    path = check_output_path(out, (first.meta.csv, second.meta.csv)) if out is not None else None
    prefixes = _prefixes(first, second, self_match)

    started = time.perf_counter()
    with connect(cluster) as active:
        found = match_features(
            first.features, second.features, options, client=active, self_match=self_match
        )
    table = _with_fields(found, first, second, prefixes)
    if self_match:  # a row of the one source matched whichever side of a pair it is on
        matched = pd.unique(found[["row_a", "row_b"]].to_numpy().ravel())
        counts = (len(matched), len(matched))
    else:
        counts = (found["row_a"].nunique(), found["row_b"].nunique())
    result = MatchResult(
        table,
        first.name,
        second.name,
        int(counts[0]),
        int(counts[1]),
        time.perf_counter() - started,
        threshold=options.threshold,
        threshold_from=threshold_from,
        top_k=options.top_k,
        rows1_ok=first.meta.status_counts.get(OK, 0),
        rows2_ok=second.meta.status_counts.get(OK, 0),
        preview=_preview(first, second, prefixes),
    )
    if path is not None:
        result.path = write_table(table, path, f"{first.name}-{second.name}")
    return result


def _check_compatible(first: Source, second: Source) -> None:
    a, b = first.meta, second.meta
    if (a.model, a.dim) != (b.model, b.dim):
        raise InputError(
            f"cannot match {first.name} ({a.model}, {a.dim}-d) with "
            f"{second.name} ({b.model}, {b.dim}-d): extract both with one model"
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
    prefix1, prefix2 = prefixes
    fields1 = first.rows(["row", *first.meta.fields]).set_index("row")
    fields2 = fields1 if self_match else second.rows(["row", *second.meta.fields]).set_index("row")
    left = fields1.loc[found["row_a"].to_numpy()].add_prefix(prefix1).reset_index(drop=True)
    right = fields2.loc[found["row_b"].to_numpy()].add_prefix(prefix2).reset_index(drop=True)
    table = pd.concat(
        [
            found[["row_a", "row_b"]].reset_index(drop=True),
            left,
            right,
            found[["similarity"]].reset_index(drop=True),
        ],
        axis=1,
    )
    if self_match:
        groups = connected_groups(
            found["row_a"].to_numpy(), found["row_b"].to_numpy(), first.meta.rows
        )
        table["group"] = groups[found["row_a"].to_numpy()].astype(np.int64)
    return table


def write_table(table: pd.DataFrame, path: Path, stem: str) -> Path:
    """Write Parquet or CSV (by suffix; a directory gets `stem.parquet`), atomically."""
    if path.is_dir():
        path = path / f"{stem}.parquet"
    try:
        if path.suffix == ".csv":
            atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
        else:
            atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
