"""`imgsim calibrate`: the threshold for a source, measured on its own images.

A sample of the source's `ok` rows, distinct from one another (no two as similar as the
source's current threshold: a collection holds duplicates of its own, which would count as
false matches), is fetched again (with the fetch policy the source was made with) on the
fetch workers, and each image gets the edit family of `edits` applied: the copies are the
positives. The model workers embed the copies with the source's model and descriptor. Each
copy is then scored against every sampled row: its own row is the match, the others are
negatives (pairs of different rows). The threshold reported is the lowest one whose
estimated precision reaches the target.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import Client
from PIL import Image, ImageOps

from ..cluster import GPU, NET, Cluster, connect, require_workers, workers_with
from ..decode import decode_image, sniff_format
from ..descriptor import DESCRIPTORS
from ..driver import made_fetch, made_weights
from ..embed import ModelPlugin, embed_pixels
from ..errors import InputError, OptionError, opt
from ..fetch import read_source
from ..models import get_spec, resolve_weights
from ..options import TASK_RETRIES, FetchOptions
from ..pairs import default_threshold
from ..schema import OK, RowFailure
from ..store import META, Source, atomic_write, open_source, stored_plan
from .edits import edited_copies

logger = logging.getLogger(__name__)

MIN_ROWS = 20  # fewer ok rows (or fewer images fetched again) give no meaningful estimate
CANDIDATES = 4  # rows looked at per row sampled, to find distinct ones
FALLBACK = 0.8  # what "distinct" means for a source without a threshold yet
DEFAULT_SAMPLE = 200
DEFAULT_PRECISION = 0.95
EDIT_SIDE = 1024  # images are edited at most this large on their long side
ROWS_PER_TASK = 8
CONTROL = "calibration"  # the key in meta.json


@dataclass
class Calibration:
    """What calibrate measured: the table of thresholds and the one recommended."""

    name: str
    table: pd.DataFrame  # threshold, precision, recall, pairs kept
    threshold: float
    precision: float
    recall: float
    positives: int
    negatives: int
    sampled: int
    fetched: int
    target_precision: float

    @property
    def summary(self) -> str:
        return (
            f"precision {self.precision:.3f}, recall {self.recall:.3f} on {self.positives} "
            f"synthetic pairs and {self.negatives} pairs of different rows "
            f"({self.fetched} images)"
        )

    def record(self) -> dict:
        """What `--save` stores in the source's meta.json."""
        return {
            "threshold": round(self.threshold, 4),
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "positives": self.positives,
            "negatives": self.negatives,
            "images": self.fetched,
            "target_precision": self.target_precision,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "summary": f"calibrated: {self.summary}",
        }


def calibrate(
    name: str,
    store: str,
    *,
    precision: float = DEFAULT_PRECISION,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    save: bool = False,
    cluster: Cluster = None,
) -> Calibration:
    """Measure the threshold reaching `precision` on `sample` of the source's own images
    (see the module's docstring); `save`: store it, so match and dedupe use it by default."""
    if not 0 < precision < 1:
        raise OptionError(f"{opt('precision')} must be between 0 and 1, got {precision}")
    if sample < MIN_ROWS:
        raise OptionError(f"{opt('sample')} must be at least {MIN_ROWS}, got {sample}")
    source = open_source(store, name)
    if not source.meta.url_col:
        raise InputError(
            f"{name} was imported from vectors, so its images cannot be fetched again: "
            f"calibrate a source made by imgsim extract"
        )
    rows = source.rows()
    ok = rows[rows["status"] == OK]
    if len(ok) < MIN_ROWS:
        raise InputError(
            f"{name} has {len(ok)} ok row(s); calibrate needs at least {MIN_ROWS} to "
            f"estimate anything (extract more images into it)"
        )
    features = source.features
    candidates = ok.sample(n=min(CANDIDATES * sample, len(ok)), random_state=seed)
    chosen = _distinct(candidates, features, sample, default_threshold(source)[0] or FALLBACK)
    if len(chosen) < MIN_ROWS:
        raise InputError(
            f"{name} has only {len(chosen)} distinct image(s) among {len(candidates)} ok rows "
            f"sampled; calibrate needs {MIN_ROWS}"
        )
    fetch, weights, pooling = _how_made(source)
    with connect(cluster) as client:
        copies, edits, failures = _synthesised(client, chosen, source.meta.url_col, fetch,
                                               weights, pooling, seed)  # fmt: skip
    fetched = len(np.unique(copies["row"])) if len(copies) else 0
    if fetched < MIN_ROWS:
        reason = f" (first failure: {failures[0]})" if failures else ""
        raise InputError(
            f"{name}: only {fetched} of {len(chosen)} sampled images could be fetched "
            f"again{reason}; calibrate needs {MIN_ROWS}, fetched with the source's fetch "
            f"policy"
        )
    originals = np.asarray(features.oindex[np.sort(np.unique(copies["row"]))], np.float32)
    calibration = _measure(name, copies, edits, originals, precision)
    calibration.sampled, calibration.fetched = len(chosen), fetched
    if save:
        meta = dataclasses.replace(source.meta, calibration=calibration.record())
        atomic_write(source.path / META, lambda tmp: Path(tmp).write_text(meta.to_json()))
    return calibration


def _distinct(candidates: pd.DataFrame, features, limit: int, below: float) -> pd.DataFrame:
    """Up to `limit` of `candidates` (in their random order) whose stored features are all
    less similar than `below` to one another, greedily; sorted by row."""
    rows = candidates["row"].to_numpy(np.int64)
    order = np.argsort(rows)
    stored = np.empty((len(rows), features.shape[1]), np.float32)
    stored[order] = features.oindex[rows[order]]
    kept: list[int] = []
    for i in range(len(rows)):
        if len(kept) == limit:
            break
        if not kept or float(np.max(stored[kept] @ stored[i])) < below:
            kept.append(i)
    return candidates.iloc[kept].sort_values("row")


def _how_made(source: Source) -> tuple[FetchOptions, object, str]:
    """The fetch options (input size included), weights and pooling the source was made
    with (its plan and meta)."""
    plan = stored_plan(source.path)
    descriptor = DESCRIPTORS[source.meta.descriptor.split("/")[0]]
    base_dir = "" if "://" in plan["csv"] else str(Path(plan["csv"]).parent)
    fetch = FetchOptions(
        **made_fetch(plan),
        image_size=source.meta.image_size or get_spec(source.meta.model).image_size,
        trim_borders=descriptor.trim_borders,
        base_dir=base_dir,
    )
    named = made_weights(plan)
    return fetch, resolve_weights(source.meta.model, named), descriptor.pooling


def _synthesised(
    client: Client,
    chosen: pd.DataFrame,
    url_col: str,
    fetch: FetchOptions,
    weights,
    pooling: str,
    seed: int,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """The features of every edited copy (`row`: the row it copies), their edits, and the
    reasons of the images that could not be fetched again."""
    require_workers(client, fetch=True, stage="calibrate")
    plugin = ModelPlugin(weights, "auto", pooling, fetch.image_size)
    client.register_plugin(plugin)
    fetch_resources = {NET: 1} if workers_with(client, NET) else None
    futures = []
    items = list(zip(chosen["row"].astype(int), chosen[url_col].astype(str)))
    for start in range(0, len(items), ROWS_PER_TASK):
        edited = client.submit(
            edit_images, items[start : start + ROWS_PER_TASK], fetch, seed,
            resources=fetch_resources, retries=TASK_RETRIES, pure=False,
        )  # fmt: skip
        futures.append(client.submit(
            embed_edited, edited, plugin.name, resources={GPU: 1}, retries=TASK_RETRIES
        ))  # fmt: skip
    rows, features, edits, failures = [], [], [], []
    for part in client.gather(futures):
        rows.append(part["row"])
        features.append(part["features"])
        edits += part["edits"]
        failures += part["failures"]
    dim = get_spec(weights.model).dim
    return (
        {
            "row": np.concatenate(rows) if rows else np.zeros(0, np.int64),
            "features": np.concatenate(features) if features else np.zeros((0, dim), np.float32),
        },
        edits,
        failures,
    )


def edit_images(items: list[tuple[int, str]], fetch: FetchOptions, seed: int) -> dict:
    """On a fetch worker: fetch each image again, make its edited copies and decode them as
    the extraction decodes images."""
    rows, pixels, edits, failures = [], [], [], []
    for row, url in items:
        try:
            image = _opened(read_source(url, fetch)[0], fetch.max_pixels)
        except RowFailure as failure:
            failures.append(f"row {row}: {failure.status}: {failure}")
            continue
        rng = np.random.default_rng([seed, row])
        for edit, copy in edited_copies(image, rng):
            out = io.BytesIO()
            copy.save(out, "JPEG", quality=90)
            pixels.append(
                decode_image(out.getvalue(), fetch.image_size, trim_borders=fetch.trim_borders)[0]
            )
            rows.append(row)
            edits.append(edit)
    size = fetch.image_size
    return {
        "row": np.asarray(rows, np.int64),
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "edits": edits,
        "failures": failures,
    }


def _opened(data: bytes, max_pixels: int) -> Image.Image:
    """Image bytes as RGB at most `EDIT_SIDE` on the long side; a failure is a RowFailure."""
    image_format = sniff_format(data)
    if image_format is None:
        raise RowFailure("not_image", "not an image any more")
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            if image.width * image.height > max_pixels:
                raise RowFailure("bomb", "over the pixel limit")
            image.draft("RGB", (EDIT_SIDE, EDIT_SIDE))
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except RowFailure:
        raise
    except Exception as exc:  # untrusted bytes: any failure means they no longer decode
        raise RowFailure("decode_error", str(exc)[:200]) from None
    rgb.thumbnail((EDIT_SIDE, EDIT_SIDE), Image.Resampling.BILINEAR)
    return rgb


def embed_edited(edited: dict, plugin_name: str, batch_size: int = 64) -> dict:
    """On a model worker: the copies' features (the pixels are dropped)."""
    from distributed import get_worker

    plugin = get_worker().plugins[plugin_name]
    assert isinstance(plugin, ModelPlugin)
    predictor = plugin.predictor()
    pixels = edited.pop("pixels")
    if len(pixels):
        edited["features"] = embed_pixels(predictor, pixels, batch_size)
    else:
        edited["features"] = np.zeros((0, predictor.dim), np.float32)
    return edited


def _measure(
    name: str,
    copies: dict[str, np.ndarray],
    edits: list[str],
    originals: np.ndarray,
    target: float,
) -> Calibration:
    """Score every copy against every sampled row and read off the thresholds."""
    sampled_rows = np.unique(copies["row"])
    similarity = copies["features"] @ originals.T  # copies x sampled rows
    own = np.searchsorted(sampled_rows, copies["row"])
    is_match = np.zeros(similarity.shape, bool)
    is_match[np.arange(len(own)), own] = True
    scores, truth = similarity.ravel(), is_match.ravel()
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], truth[order]
    true_kept = np.cumsum(hits)
    precision = true_kept / np.arange(1, len(hits) + 1)
    recall = true_kept / max(1, int(truth.sum()))
    grid = np.round(np.arange(0.30, 0.99, 0.05), 2)
    kept = np.searchsorted(-ranked, -grid, side="right")  # pairs with a score >= threshold
    table = pd.DataFrame(
        {
            "threshold": grid,
            "precision": [precision[k - 1] if k else 1.0 for k in kept],
            "recall": [recall[k - 1] if k else 0.0 for k in kept],
            "pairs": kept,
        }
    )
    reaching = np.flatnonzero(precision >= target)
    i = int(reaching[-1]) if len(reaching) else 0
    # the threshold just above the next score below: every pair it keeps was counted
    threshold = float(ranked[i]) if i + 1 == len(ranked) else float((ranked[i] + ranked[i + 1]) / 2)
    return Calibration(
        name=name,
        table=table,
        threshold=round(threshold, 4),
        precision=float(precision[i]),
        recall=float(recall[i]),
        positives=int(truth.sum()),
        negatives=int((~truth).sum()),
        sampled=0,
        fetched=0,
        target_precision=target,
    )
