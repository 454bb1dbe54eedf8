"""Schema: the contracts between stages, the row table's columns and statuses, and what a
stored source records about itself (`SourcePlan` in plan.json, `SourceMeta` in meta.json).

Every stage reads these from here; nothing else spells a status or a column name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .descriptor import LEGACY as LEGACY_DESCRIPTOR
from .errors import StoreError, opt

FORMAT_VERSION = 2  # of a stored source; 1: the stores written before it was recorded

ROW = "row"  # the fixed row id, 0..n-1 in CSV order
INGEST_ERROR = "_ingest_error"  # travels from ingest to fetch, never to the outputs
STATUS_COLUMNS = ("status", "error", "http_status", "bytes", "sha256", "width", "height")
THUMBNAIL = "thumbnail"  # a small JPEG of an ok row (`FetchOptions.thumbnails`), for review
RESERVED_COLUMNS = (ROW, *STATUS_COLUMNS, THUMBNAIL, INGEST_ERROR)
# plan.json `fetch` keys added since stores were first written, with the value that a store
# written before the key existed had in effect (a plan without the key means that value)
FETCH_KEYS_ADDED = {"thumbnails": False}
LEGACY_IMAGE_SIZE = 224  # every model's input size before sources recorded it
# plan.json keys added since, likewise
PLAN_KEYS_ADDED = {"descriptor": LEGACY_DESCRIPTOR, "image_size": LEGACY_IMAGE_SIZE}

OK = "ok"
# Failures worth fetching again later (the server or network may do better next time).
TRANSIENT_STATUSES = frozenset(
    {
        "timeout",
        "connection_error",
        "dns_error",
        "truncated",
        "http_5xx",
        "http_429",
        "io_error",
    }
)


@dataclass(frozen=True)
class SourcePlan:
    """What fixes an extraction's output (plan.json): a resumed run must agree on all of it.

    `csv_bytes`/`csv_mtime_ns` identify a local CSV (absent for a URL); `weights` is a
    weights file's sha256, or the description of random or package weights. `weights_file`
    says where a weights file was (so a resumed run finds it again); it is not compared.
    """

    csv: str
    rows: int
    dim: int
    partition_rows: int
    model: str
    weights: str
    fetch: dict[str, Any]
    fields: list[str]
    url_col: str
    id_col: str
    delimiter: str
    header: bool
    descriptor: str = LEGACY_DESCRIPTOR  # `Descriptor.key`
    image_size: int = LEGACY_IMAGE_SIZE  # the model's input, pixels a side
    csv_bytes: int | None = None
    csv_mtime_ns: int | None = None
    weights_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The plan as stored: local-file fields only where the CSV is a local file."""
        document = dataclasses.asdict(self)
        for key in ("csv_bytes", "csv_mtime_ns", "weights_file"):
            if document[key] is None:
                del document[key]
        return document

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """The plan keys where `stored` (a plan.json document) differs from this plan."""
        mine = self.to_json()
        stored = {
            **PLAN_KEYS_ADDED,
            **stored,
            "fetch": {**FETCH_KEYS_ADDED, **stored.get("fetch", {})},
        }
        keys = (set(mine) | set(stored)) - {"weights_file"}
        return [key for key in sorted(keys) if stored.get(key) != mine.get(key)]


@dataclass(frozen=True)
class SourceMeta:
    """What a complete source says about itself (meta.json, written last: the commit point)."""

    name: str
    model: str
    dim: int
    threshold: float | None  # the model's recommended threshold (None: imported, none given)
    weights: str  # a description: "file PATH", "keras cache PATH", "random (seed N)", ...
    weights_sha256: str
    csv: str
    fields: list[str]
    url_col: str
    id_col: str
    rows: int
    status_counts: dict[str, int]
    partition_rows: int
    batch_size: int
    runtime: list[str]
    seconds: float
    images_per_second: float | None
    created: str
    versions: dict[str, str]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    descriptor: str = LEGACY_DESCRIPTOR  # `Descriptor.key`; "imported" for imported vectors
    image_size: int | None = LEGACY_IMAGE_SIZE  # the model's input; None for imported vectors
    calibration: dict[str, Any] | None = None  # `imgsim calibrate --save`: its threshold, how
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str, where: str) -> SourceMeta:
        """Read meta.json; a store of a newer format, or a damaged file, is one StoreError."""
        try:
            document = json.loads(text)
            version = int(document.get("format_version", 1))
        except (ValueError, TypeError, AttributeError):
            raise StoreError(
                f"{where}: meta.json is not readable JSON; extract the source "
                f"again with {opt('overwrite')}"
            ) from None
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{where} was written in store format {version} by a newer "
                f"imgsim-dask (this one reads up to {FORMAT_VERSION}); upgrade "
                "imgsim-dask to read it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        document = {k: v for k, v in document.items() if k in known}
        document["format_version"] = version
        try:
            return cls(**document)
        except TypeError as exc:
            raise StoreError(
                f"{where}: meta.json lacks a field ({exc}); extract the source "
                f"again with {opt('overwrite')}"
            ) from None


class RowFailure(Exception):
    """One row could not be turned into an image; `status` is its code in the row table."""

    def __init__(self, status: str, message: str, http_status: int | None = None):
        super().__init__(message)
        self.status = status
        self.http_status = http_status
