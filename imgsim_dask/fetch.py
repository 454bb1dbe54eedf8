"""Fetch and decode: turn one partition of rows into uint8 model inputs plus a status per row.

Runs on CPU workers. Downloads overlap in a per-process thread pool with one
`requests.Session` per thread (HTTP keep-alive, urllib3 retries on 429/5xx/connection
errors). Every row gets a status (`ok` or a failure code) and never stops the run.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

OK = "ok"
STATUS_COLUMNS = ("status", "error", "http_status", "bytes", "sha256", "width", "height")
_USER_AGENT = "imgsim-dask/0.1 (+https://pypi.org/project/imgsim-dask/)"


@dataclass(frozen=True)
class FetchOptions:
    """How images are fetched and decoded."""

    image_size: int = 224
    threads: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retries: int = 2
    max_bytes: int = 32 * 2**20
    base_dir: str = ""  # relative local paths are resolved against this


class RowFailure(Exception):
    """One row could not be turned into an image; `status` is its code in the row table."""

    def __init__(self, status: str, message: str, http_status: int | None = None):
        super().__init__(message)
        self.status = status
        self.http_status = http_status


@dataclass
class FetchedPartition:
    """A partition after fetch+decode: the row table with statuses and the decoded pixels."""

    rows: pd.DataFrame  # input fields + `row` + STATUS_COLUMNS
    pixels: np.ndarray  # uint8 (n_ok, size, size, 3), in row order of the `ok` rows


_local = threading.local()
_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _session(options: FetchOptions) -> requests.Session:
    """This thread's HTTP session (created once per thread, reused for keep-alive)."""
    session = getattr(_local, "session", None)
    if session is None:
        retry = Retry(
            total=options.retries,
            connect=options.retries,
            read=options.retries,
            status=options.retries,
            backoff_factor=0.2,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=4)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = _USER_AGENT
        session.max_redirects = 5
        _local.session = session
    return session


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide download pool, shared by the partition tasks running on this worker."""
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="imgsim-fetch")
        return _pools[threads]


def read_source(url: str, options: FetchOptions) -> tuple[bytes, int | None]:
    """The raw bytes of an image URL or local path, and the HTTP status if any."""
    url = url.strip()
    if not url:
        raise RowFailure("bad_url", "empty URL")
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _read_http(url, options)
    if scheme == "file":
        return _read_file(unquote(urlparse(url).path), options), None
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise RowFailure("bad_url", f"unsupported URL scheme {scheme!r}")
    path = url if os.path.isabs(url) else os.path.join(options.base_dir, url)
    return _read_file(path, options), None


def _read_http(url: str, options: FetchOptions) -> tuple[bytes, int]:
    try:
        with _session(options).get(
            url, stream=True, timeout=(options.connect_timeout, options.read_timeout)
        ) as response:
            code = response.status_code
            if code >= 400:
                status = "http_5xx" if code >= 500 else f"http_{code}"
                raise RowFailure(status, f"HTTP {code} {response.reason or ''}".strip(), code)
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > options.max_bytes:
                raise RowFailure("too_large", f"Content-Length {declared} exceeds "
                                 f"{options.max_bytes} bytes", code)
            body = bytearray()
            for block in response.iter_content(64 * 1024):
                body += block
                if len(body) > options.max_bytes:
                    raise RowFailure("too_large", f"body exceeds {options.max_bytes} bytes", code)
            return bytes(body), code
    except RowFailure:
        raise
    except requests.exceptions.Timeout as exc:
        raise RowFailure("timeout", f"timed out: {type(exc).__name__}") from None
    except requests.exceptions.TooManyRedirects:
        raise RowFailure("http_redirects", "too many redirects") from None
    except requests.exceptions.RetryError as exc:
        raise RowFailure("http_5xx", f"retries exhausted: {exc}") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema, ValueError) as exc:
        raise RowFailure("bad_url", str(exc)) from None
    except requests.exceptions.RequestException as exc:
        if _is_timeout(exc):
            raise RowFailure("timeout", f"timed out: {exc}"[:300]) from None
        raise RowFailure("connection_error", f"{type(exc).__name__}: {exc}"[:300]) from None


def _is_timeout(exc: BaseException) -> bool:
    """True when a timeout hides inside urllib3's retry wrapper (`MaxRetryError.reason`)."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, TimeoutError | urllib3.exceptions.TimeoutError)


def _read_file(path: str, options: FetchOptions) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > options.max_bytes:
            raise RowFailure("too_large", f"file is {size} bytes, over {options.max_bytes}")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RowFailure("not_found", f"no such file: {path}") from None
    except IsADirectoryError:
        raise RowFailure("not_found", f"is a directory: {path}") from None
    except OSError as exc:
        raise RowFailure("io_error", f"{type(exc).__name__}: {exc}") from None


def decode_image(data: bytes, size: int) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to uint8 RGB `size` x `size`; return it with the original width, height."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale
                image = ImageOps.exif_transpose(image)
                if image.mode != "RGB":
                    image = image.convert("RGB")
                image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
                return np.asarray(image, dtype=np.uint8), width, height
    except UnidentifiedImageError:
        raise RowFailure("not_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowFailure("bomb", str(exc)[:300]) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RowFailure("decode_error", f"{type(exc).__name__}: {exc}"[:300]) from None


def _fetch_one(url: str, options: FetchOptions) -> tuple[np.ndarray | None, dict]:
    record: dict = {"status": OK, "error": "", "http_status": None, "bytes": None,
                    "sha256": "", "width": None, "height": None}
    try:
        data, http_status = read_source(url, options)
        record["http_status"] = http_status
        record["bytes"] = len(data)
        record["sha256"] = hashlib.sha256(data).hexdigest()
        pixels, record["width"], record["height"] = decode_image(data, options.image_size)
        return pixels, record
    except RowFailure as failure:
        record["status"] = failure.status
        record["error"] = str(failure)
        if failure.http_status is not None:
            record["http_status"] = failure.http_status
        return None, record


def fetch_partition(rows: pd.DataFrame, url_col: str, options: FetchOptions) -> FetchedPartition:
    """Fetch and decode every row of a partition concurrently; failures become statuses."""
    urls = rows[url_col].astype(str).tolist()
    results = list(_pool(options.threads).map(lambda u: _fetch_one(u, options), urls))
    table = rows.copy()
    records = pd.DataFrame([record for _, record in results], index=table.index)
    for column in STATUS_COLUMNS:
        table[column] = records[column]
    table["http_status"] = table["http_status"].astype("Int16")
    for column in ("bytes", "width", "height"):
        table[column] = table[column].astype("Int64")
    size = options.image_size
    decoded = [pixels for pixels, _ in results if pixels is not None]
    pixels = np.stack(decoded) if decoded else np.zeros((0, size, size, 3), np.uint8)
    return FetchedPartition(table, pixels)
