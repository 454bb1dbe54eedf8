"""Review: one self-contained HTML page to look at a match instead of reading its table.

`review_pairs` reads a pairs file (a `.parquet` file or Parquet dataset that `match`,
`dedupe` or `run` wrote; each records its store, sources and threshold), picks at most
`max_pairs_shown` pairs (the most similar, the borderline band on both sides of the
threshold, a random sample), and writes a page with the thumbnails stored at extraction
(nothing is fetched again), the key fields of both rows, a histogram of similarities with
a threshold slider, the near-duplicate groups of a dedupe, and each source's failed rows.

Pairs just below the threshold are not in a pairs file: they come from scoring a random
sample of stored rows here (bounded: `SAMPLE_ROWS`), which also gives the histogram of all
pairs' similarities. A source missing from the store, or made without thumbnails, gives
placeholders and a warning, never a failure.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..errors import ImgsimError, OptionError, opt
from ..options import ReviewOptions
from ..pairs import DATASET_RECORD, GROUPS, PAIRS_RECORD, MatchResult, is_dataset
from ..schema import OK
from ..store import (
    PartitionStore,
    Source,
    atomic_write,
    open_source,
    read_parquet,
    store_path,
)
from .page import render_page

BAND = 0.03  # the borderline band: this far above and below the threshold
SAMPLE_ROWS = (512, 8192)  # rows of each side scored here for near misses and the histogram
SAMPLE_SEED = 0  # the same pairs file always gives the same page
BINS = 50
GROUP_MEMBERS_SHOWN = 12
FAILED_EXAMPLES = 5
SINGLE_FILE_LIMIT = 50 * 2**20  # bytes: beyond this, a folder with thumbs/ (`--out DIR/`)
PAIR_COLUMNS = ["row_a", "row_b", "similarity"]


@dataclass
class ReviewResult:
    """What was written, and what the page could not show."""

    path: Path
    pairs_shown: int
    total_pairs: int
    bytes: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"review: {self.pairs_shown} of {self.total_pairs} pairs shown, "
            f"{self.bytes / 2**20:.1f} MiB -> {self.path}"
        )


def check_review_output(out: str | os.PathLike) -> tuple[Path, bool]:
    """The page's file (`DIR/index.html` for a folder) and whether it is a folder, or a
    one-line error when it cannot be written there."""
    text = os.fspath(out)
    folder = text.endswith(("/", os.sep)) or Path(text).is_dir()
    target = Path(text) / "index.html" if folder else Path(text)
    if not folder and target.suffix.lower() not in (".html", ".htm"):
        raise OptionError(f"review page {out}: name it .html, or DIR/ for a folder")
    parent = Path(text) if folder else target.parent
    if folder and not parent.exists():
        if not parent.parent.is_dir():
            raise OptionError(f"review page {out}: {parent.parent} does not exist")
    elif not parent.is_dir():
        raise OptionError(f"review page {out}: directory {parent} does not exist")
    if not os.access(parent if parent.exists() else parent.parent, os.W_OK):
        raise OptionError(f"review page {out}: cannot write in {parent}")
    return target, folder


def review_pairs(
    pairs: str | os.PathLike, out: str | os.PathLike, options: ReviewOptions | None = None
) -> ReviewResult:
    """Write the review page of the pairs file `pairs` to `out` (`.html`, or `DIR/`)."""
    target, folder = check_review_output(out)
    table, about = _load(pairs)
    return _write(table, about, target, folder, options or ReviewOptions())


def review_result(
    result: MatchResult, out: str | os.PathLike, options: ReviewOptions | None = None
) -> ReviewResult:
    """The review page of a match just made (its table here, or the dataset it wrote)."""
    if not result.complete and result.path is not None:
        return review_pairs(str(result.path), out, options)
    target, folder = check_review_output(out)
    return _write(result.pairs, result.about, target, folder, options or ReviewOptions())


def _load(pairs: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """The pairs (every column of a file; a dataset's row ids, similarity and groups) and
    the record of how they were made."""
    text = os.fspath(pairs)
    if text.lower().endswith(".csv"):
        raise OptionError(
            f"PAIRS {text}: a CSV does not record which sources it came from; review the "
            ".parquet file or DIR/ of a match, or pass --review to the match"
        )
    try:
        if is_dataset(text):
            path = store_path(text.rstrip("/"))
            if not (path / DATASET_RECORD).exists():
                raise OptionError(
                    f"PAIRS {text}: not a complete pairs dataset (no {DATASET_RECORD})"
                )
            record = json.loads((path / DATASET_RECORD).read_text())
            about = record.get("about") or _about_of_old(record)
            table = read_parquet(path, columns=PAIR_COLUMNS) if record.get("pairs") else None
            if table is None:
                table = pd.DataFrame({c: np.empty(0) for c in PAIR_COLUMNS})
            if about["self_match"] and (path / GROUPS).exists():
                groups = read_parquet(path / GROUPS).set_index("row")["group"]
                table["group"] = groups.reindex(table["row_a"]).to_numpy()
            return table, about
        file = Path(text)
        if not file.is_file():
            raise OptionError(f"PAIRS {text}: no such file")
        metadata = pq.read_schema(file).metadata or {}
        if PAIRS_RECORD not in metadata:
            raise OptionError(
                f"PAIRS {text}: no record of the sources it came from (not written by "
                "imgsim match or dedupe?)"
            )
        return pd.read_parquet(file), json.loads(metadata[PAIRS_RECORD])
    except (OSError, ValueError) as exc:
        raise OptionError(f"PAIRS {text}: cannot read it: {exc}".split("\n")[0]) from None


def _about_of_old(record: dict) -> dict:
    """What a dataset written before records had `about` says of itself."""
    first, second = record["sources"]
    self_match = first == second
    return {
        "store": record["store"],
        "sources": record["sources"],
        "threshold": record.get("threshold"),
        "threshold_from": "" if record.get("threshold") is None else "given",
        "top_k": record.get("top_k"),
        "self_match": self_match,
        "prefixes": [f"{first}_a_", f"{first}_b_"] if self_match else [f"{first}_", f"{second}_"],
    }


@dataclass
class _Side:
    """One side of the pairs: its source (None: missing from the store) and what the page
    shows of its rows."""

    name: str
    prefix: str
    source: Source | None
    shown: list[str]  # the fields shown per row
    run: str = field(default_factory=lambda: uuid.uuid4().hex)  # this page's parts cache

    def fields(self, rows: np.ndarray, table: pd.DataFrame, column: str) -> list[list]:
        """[(field, value) ...] of each of `rows`: from the source, else the pairs table."""
        if self.source is not None:
            meta = self.source.meta
            store = PartitionStore.of(self.source.path, meta.partition_rows)
            found = store.fields(rows, self.shown, run=self.run) if self.shown else None
        else:  # the pairs table's own copy of the fields, where it has them
            kept = [c for c in table.columns if c.startswith(self.prefix)][:4]
            found = table.drop_duplicates(column).set_index(column)[kept].reindex(rows)
            found.columns = [c.removeprefix(self.prefix) for c in kept]
        if found is None:
            return [[["row", int(row)]] for row in rows]
        return [
            [
                ["row", int(row)],
                *([name, _text(value)] for name, value in zip(found.columns, values)),
            ]
            for row, values in zip(rows, found.itertuples(index=False))
        ]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _sides(about: dict, warnings: list[str]) -> tuple[_Side, _Side]:
    sides: list[_Side] = []
    for name, prefix in zip(about["sources"], about["prefixes"]):
        if sides and about["self_match"]:
            sides.append(_Side(name, prefix, sides[0].source, sides[0].shown))
            break
        try:
            source: Source | None = open_source(about["store"], name)
        except ImgsimError as exc:
            warnings.append(f"source {name} is not in the store: {exc}; placeholders shown")
            source = None
        shown: list[str] = []
        if source is not None:
            meta = source.meta
            others = [f for f in meta.fields if f not in (meta.id_col, meta.url_col)][:2]
            shown = list(dict.fromkeys([meta.id_col, *others, meta.url_col]))
            shown = [f for f in shown if f in meta.fields]
            if not source.has_thumbnails:
                warnings.append(
                    f"source {name} has no thumbnails (extracted with --no-thumbnails, "
                    "imported, or by an older imgsim-dask); placeholders shown"
                )
        sides.append(_Side(name, prefix, source, shown))
    return sides[0], sides[1]


def _select(similarity: np.ndarray, threshold: float | None, limit: int) -> tuple:
    """Indexes of the pairs shown: the most similar, the band just above the threshold,
    and a random sample of the others; at most `limit` (with `near` misses below it)."""
    rng = np.random.default_rng(SAMPLE_SEED)
    order = np.argsort(-similarity, kind="stable")
    n_top = limit * 2 // 5
    n_band = limit * 3 // 10 if threshold is not None else 0
    top = order[:n_top]
    rest = order[n_top:]
    band = np.empty(0, np.int64)
    if threshold is not None and n_band:
        close = rest[similarity[rest] < threshold + BAND][::-1]  # nearest the threshold first
        band = close[: n_band // 2]
        rest = rest[~np.isin(rest, band)]
    n_sample = max(0, limit - len(top) - n_band)
    sample = rng.choice(rest, size=min(n_sample, len(rest)), replace=False)
    return top, band, np.sort(sample), n_band - len(band)


def _sample(first: _Side, second: _Side, self_match: bool) -> tuple[np.ndarray, pd.DataFrame]:
    """Similarities of random pairs of stored rows (a few random partitions of each side),
    and those pairs as a table (for the near misses below the threshold)."""
    empty = pd.DataFrame({c: np.empty(0) for c in PAIR_COLUMNS})
    if first.source is None or second.source is None:
        return np.empty(0, np.float32), empty
    rng = np.random.default_rng(SAMPLE_SEED)
    picked = []
    for side, budget in zip((first, second), SAMPLE_ROWS):
        assert side.source is not None
        meta, features = side.source.meta, side.source.features
        starts = rng.permutation(range(0, meta.rows, meta.partition_rows))
        rows, vectors = [], []
        for start in starts[: max(1, budget // meta.partition_rows)]:
            block = np.asarray(features[start : start + meta.partition_rows], np.float32)
            ok = np.isfinite(block).all(axis=1)
            rows.append(np.arange(start, start + len(block))[ok])
            vectors.append(block[ok])
        found, matrix = np.concatenate(rows)[:budget], np.concatenate(vectors)[:budget]
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        picked.append((found, matrix / np.where(norms == 0, 1, norms)))
    (rows_a, a), (rows_b, b) = picked
    scores = a @ b.T
    keep = rows_a[:, None] < rows_b[None, :] if self_match else np.ones(scores.shape, bool)
    i, j = np.nonzero(keep)
    table = pd.DataFrame({"row_a": rows_a[i], "row_b": rows_b[j], "similarity": scores[i, j]})
    return scores[keep], table


def _images(
    first: _Side, second: _Side, wanted: dict[str, set[int]], folder: Path | None
) -> tuple[list[str | None], dict[tuple[str, int], int], int]:
    """Every thumbnail the page shows, once: as data URIs, or files in `folder/thumbs`."""
    images: list[str | None] = []
    index: dict[tuple[str, int], int] = {}
    size = 0
    sides = {"a": first, "b": second}
    for key, rows in wanted.items():
        side = sides[key]
        ordered = np.array(sorted(rows), np.int64)
        found = side.source.thumbnails(ordered) if side.source is not None else []
        for row, jpeg in zip(ordered.tolist(), found or [None] * len(ordered)):
            index[(key, row)] = len(images)
            if jpeg is None:
                images.append(None)
            elif folder is not None:
                name = f"thumbs/{key}-{row}.jpg"
                (folder / name).write_bytes(jpeg)
                images.append(name)
            else:
                uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
                size += len(uri)
                images.append(uri)
    return images, index, size


def _write(
    table: pd.DataFrame, about: dict, target: Path, folder: bool, options: ReviewOptions
) -> ReviewResult:
    warnings: list[str] = []
    first, second = _sides(about, warnings)
    self_match, threshold = bool(about["self_match"]), about.get("threshold")
    similarity = table["similarity"].to_numpy(np.float64)
    limit = options.max_pairs_shown
    top, band, sample, n_near = _select(similarity, threshold, limit)
    sampled, near = _sample(first, second, self_match)
    if threshold is not None and len(near):
        below = near[(near["similarity"] < threshold) & (near["similarity"] >= threshold - BAND)]
        near = below.nlargest(n_near, "similarity")
    else:
        near = near.iloc[:0]
    groups = _groups(table, limit) if self_match and "group" in table else []

    wanted: dict[str, set[int]] = {"a": set(), "b": set()}
    shown_a = np.concatenate([top, band, sample]).astype(np.int64)
    for frame in (table.iloc[shown_a], near):
        wanted["a"].update(frame["row_a"].astype(np.int64).tolist())
        wanted["b" if not self_match else "a"].update(frame["row_b"].astype(np.int64).tolist())
    for group in groups:
        wanted["a"].update(group["rows"])
    if folder:
        (target.parent / "thumbs").mkdir(parents=True, exist_ok=True)
    images, index, size = _images(first, second, wanted, target.parent if folder else None)
    if not folder and size > SINGLE_FILE_LIMIT:
        raise OptionError(
            f"the review page would be {size / 2**20:.0f} MiB with its thumbnails in it; "
            f"write a folder instead (DIR/), or show fewer ({opt('max_pairs_shown')})"
        )
    b_key = "a" if self_match else "b"

    def cards(frame: pd.DataFrame, from_table: bool) -> list[dict]:
        rows_a = frame["row_a"].to_numpy(np.int64)
        rows_b = frame["row_b"].to_numpy(np.int64)
        fields_a = first.fields(rows_a, table if from_table else frame, "row_a")
        fields_b = second.fields(rows_b, table if from_table else frame, "row_b")
        return [
            {
                "s": round(float(s), 4),
                "a": {"image": index.get(("a", int(ra))), "fields": fa},
                "b": {"image": index.get((b_key, int(rb))), "fields": fb},
            }
            for ra, rb, s, fa, fb in zip(rows_a, rows_b, frame["similarity"], fields_a, fields_b)
        ]

    near_cards = cards(near, from_table=False) if len(near) else []
    data = {
        "title": _title(about),
        "images": images,
        "pairs": cards(table.iloc[np.concatenate([top, sample])], True),
        "borderline": cards(table.iloc[band], True) + near_cards,
        "groups": [_group_card(g, first, index, table) for g in groups],
        "histogram": _histogram(similarity, sampled, threshold),
        "slider": _slider(similarity, threshold),
        "shownCount": len(top) + len(sample),
        "borderlineNote": _band_note(threshold, len(band), len(near), len(sampled)),
        "pairsNote": (
            f"{len(top) + len(sample)} of {len(table)} pairs: the {len(top)} most similar"
            + (f" and a random sample of {len(sample)}" if len(sample) else "")
            + "; the full table stays in the pairs file"
        ),
        "groupsNote": _groups_note(self_match, table, groups),
    }
    header = _header(about, first, second, table, len(top) + len(band) + len(sample), limit)
    page = render_page(data, header, warnings, _failures(first, second, self_match))
    atomic_write(target, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    total = size if not folder else sum(p.stat().st_size for p in target.parent.rglob("*"))
    return ReviewResult(
        target, len(top) + len(band) + len(sample), len(table), len(page) + total, warnings
    )


def _title(about: dict) -> str:
    first, second = about["sources"]
    return f"imgsim review: {first}" + ("" if about["self_match"] else f" x {second}")


def _header(
    about: dict, first: _Side, second: _Side, table: pd.DataFrame, shown: int, limit: int
) -> list[str]:
    lines = []
    for side in (first,) if about["self_match"] else (first, second):
        if side.source is None:
            lines.append(f"{side.name}: not in the store {about['store']}")
            continue
        meta = side.source.meta
        ok = meta.status_counts.get(OK, 0)
        lines.append(
            f"{side.name}: {meta.rows} rows ({ok} ok), {meta.model} ({meta.dim}-d, "
            f"weights: {meta.weights}), store {about['store']}"
        )
    threshold, top_k = about.get("threshold"), about.get("top_k")
    kept = (
        f"kept pairs with similarity >= {threshold:g} ({about.get('threshold_from') or 'given'})"
        if threshold is not None
        else "no threshold"
    )
    if top_k:
        kept += f", at most the {top_k} best per row of {first.name}"
    lines.append(kept)
    counts = f"{len(table)} pairs; rows matched: "
    if about["self_match"]:
        rows = pd.unique(table[["row_a", "row_b"]].to_numpy().ravel())
        groups = table["group"].nunique() if "group" in table else 0
        counts += f"{len(rows)} of {first.name}, in {groups} groups"
    else:
        counts += (
            f"{table['row_a'].nunique()} of {first.name}, {table['row_b'].nunique()} of "
            f"{second.name}"
        )
    lines.append(counts)
    lines.append(f"showing {shown} of {len(table)} pairs (at most {limit}: --max-pairs-shown)")
    return lines


def _band_note(threshold: float | None, above: int, below: int, sampled: int) -> str:
    if threshold is None:
        return "no threshold: no borderline band"
    return (
        f"{above} kept pairs within {BAND} above the threshold; {below} pairs within {BAND} "
        f"below it, found among {sampled} random pairs of stored rows (shaded)"
    )


def _histogram(kept: np.ndarray, sampled: np.ndarray, threshold: float | None) -> dict:
    values = np.concatenate([kept, sampled]) if len(sampled) else kept
    low = float(np.percentile(values, 0.5)) if len(values) else 0.0
    if threshold is not None:
        low = min(low, threshold - BAND)
    low = max(-1.0, min(low, 0.99))
    edges = np.linspace(low, 1.0, BINS + 1)
    kept_counts = np.histogram(np.clip(kept, low, 1.0), edges)[0]
    sample_counts = np.histogram(np.clip(sampled, low, 1.0), edges)[0]
    scale = len(kept) / len(sampled) if len(sampled) and len(kept) else 1.0
    return {
        "edges": [round(float(e), 4) for e in edges],
        "kept": kept_counts.tolist(),
        "sample": sample_counts.tolist(),
        "sampleScale": scale,
        "sampleLabel": f"{len(sampled)} random pairs of stored rows, scaled to the kept count",
    }


def _slider(similarity: np.ndarray, threshold: float | None) -> dict:
    lowest = float(similarity.min()) if len(similarity) else 0.0
    value = threshold if threshold is not None else lowest
    low = min(lowest, value) - BAND
    return {"min": round(max(-1.0, low), 3), "max": 1, "value": round(value, 4)}


def _groups(table: pd.DataFrame, limit: int) -> list[dict]:
    """The largest groups first, until `limit` member thumbnails are placed."""
    members = pd.concat(
        [table[["group", "row_a"]].rename(columns={"row_a": "row"}),
         table[["group", "row_b"]].rename(columns={"row_b": "row"})]
    ).drop_duplicates()  # fmt: skip
    sizes = members.groupby("group")["row"].size().sort_values(ascending=False, kind="stable")
    rows_of = members.groupby("group")["row"].apply(lambda r: sorted(r.astype(int)))
    found, placed = [], 0
    for group, size in sizes.items():
        if placed >= limit:
            break
        rows = rows_of[group][:GROUP_MEMBERS_SHOWN]
        found.append({"id": int(group), "size": int(size), "rows": rows})
        placed += len(rows)
    return found


def _group_card(group: dict, side: _Side, index: dict, table: pd.DataFrame) -> dict:
    rows = np.array(group["rows"], np.int64)
    fields = side.fields(rows, table, "row_a")
    members = [{"image": index.get(("a", int(r))), "fields": f} for r, f in zip(rows, fields)]
    return {"id": group["id"], "size": group["size"], "members": members}


def _groups_note(self_match: bool, table: pd.DataFrame, groups: list) -> str:
    if not self_match:
        return "groups are for a match of a source with itself (imgsim dedupe)"
    total = table["group"].nunique() if "group" in table else 0
    return f"{len(groups)} of {total} groups, largest first"


def _failures(first: _Side, second: _Side, self_match: bool) -> list:
    found = []
    for side in (first,) if self_match else (first, second):
        if side.source is None:
            continue
        meta = side.source.meta
        counts = {k: v for k, v in sorted(meta.status_counts.items()) if k != OK}
        examples = []
        if counts:
            columns = list(dict.fromkeys(["row", meta.url_col, "status", "error"]))
            rows = side.source.rows(columns)
            failed = rows[rows["status"] != OK].head(FAILED_EXAMPLES)
            examples = [
                (r["row"], r.get(meta.url_col, ""), r["status"], r["error"])
                for r in failed.to_dict("records")
            ]
        found.append((side.name, counts, examples))
    return found
