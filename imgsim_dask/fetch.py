"""Fetch: turn one partition of rows into uint8 model inputs plus a status per row.

Runs on CPU workers; the bytes are decoded by `decode`. Downloads overlap in a
per-process thread pool; each thread keeps its own urllib3 pools (HTTP keep-alive) whose
connections obey an address policy (see `safehttp`). Every fetch is bounded: connect and
read timeouts, a total deadline, a byte cap, a redirect cap, bounded retries. Content is
identified by its magic bytes, never by Content-Type. Every row gets a status (`ok` or a
failure code) and never stops the run.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import stat
import threading
import time
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import certifi
import numpy as np
import pandas as pd
import pyarrow as pa
from distributed.threadpoolexecutor import ThreadPoolExecutor
from urllib3 import BaseHTTPResponse, Retry, Timeout
from urllib3.exceptions import (
    HTTPError,
    InvalidChunkLength,
    InvalidHeader,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    PoolError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from .about import PACKAGE, VERSION
from .decode import NOT_IMAGE, SNIFF_BYTES, decode_image, sniff_format
from .options import FetchOptions
from .safehttp import (
    AddressPolicy,
    BlockedAddress,
    Deadline,
    GuardedPoolManager,
    host_port,
    os_reason,
    plain,
    watched_deadline,
)
from .schema import INGEST_ERROR, OK, STATUS_COLUMNS, THUMBNAIL, RowFailure

_USER_AGENT = f"{PACKAGE}/{VERSION} (+https://pypi.org/project/{PACKAGE}/)"
_HEADERS = {"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.8"}
_RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK_BYTES = 64 * 1024
_SSL_NOISE = re.compile(r"^\[[^]]*\] | \(_ssl\.c:\d+\)$")  # "[SSL: X] ... (_ssl.c:1006)"


@dataclass
class FetchedPartition:
    """A partition after fetch+decode: the row table with statuses and the decoded pixels."""

    rows: pd.DataFrame  # input fields + `row` + STATUS_COLUMNS
    pixels: np.ndarray  # uint8 (n_ok, size, size, 3), in row order of the `ok` rows
    seconds: float = 0.0  # wall time of the fetch task


_local = threading.local()
_pool_lock = threading.Lock()
_jitter = random.Random()  # retry jitter; never touches the global generator that others seed
_pools: dict[int, ThreadPoolExecutor] = {}


def _pool_manager(options: FetchOptions) -> GuardedPoolManager:
    """This thread's connection pools for the options' address policy (kept for keep-alive)."""
    policy = AddressPolicy(options.allow_link_local, options.public_only)
    managers = getattr(_local, "managers", None)
    if managers is None:
        managers = _local.managers = {}
    if policy not in managers:
        managers[policy] = GuardedPoolManager(policy, headers=_HEADERS, ca_certs=certifi.where())
    return managers[policy]


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide download pool, shared by the partition tasks running on this worker.
    Its threads are daemons (distributed's executor): a process that ends, such as a CLI
    interrupted while a download hangs, does not wait for its timeout."""
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="imgsim-fetch")
        return _pools[threads]


def read_source(url: str, options: FetchOptions) -> tuple[bytes, int | None]:
    """The raw bytes of an image URL or local path, and the HTTP status if any."""
    url = url.strip()
    if not url:
        raise RowFailure("bad_url", "empty URL")
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        _require_scheme(scheme, options)
        return _read_http(url, options)
    if scheme == "file":
        _require_scheme("file", options)
        if parts.netloc not in ("", "localhost"):
            raise RowFailure("bad_url", f"file URL with a remote host {parts.netloc!r}")
        return _read_file(unquote(parts.path), options), None
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        _require_scheme(scheme, options)  # a well-formed scheme we never fetch: blocked
    _require_scheme("file", options)
    path = url if os.path.isabs(url) else os.path.join(options.base_dir, url)
    return _read_file(path, options), None


def _split(url: str) -> SplitResult:
    """`url` split into its parts; `bad_url` when it cannot be (e.g. an unclosed `[`)."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise RowFailure("bad_url", f"malformed URL {url[:200]!r}: {exc}"[:300]) from None


def _require_scheme(scheme: str, options: FetchOptions) -> None:
    """`blocked` unless `scheme` is allowed: refused before anything is resolved or opened."""
    if scheme not in options.schemes:
        what = "local files are" if scheme == "file" else f"{scheme} URLs are"
        why = " with public_only" if scheme == "file" and options.public_only else ""
        raise RowFailure(
            "blocked", f"{what} not fetched{why} (allowed: {', '.join(options.schemes) or 'none'})"
        )


def _read_http(url: str, options: FetchOptions) -> tuple[bytes, int]:
    manager = _pool_manager(options)
    with watched_deadline(options.deadline) as deadline:
        response = None
        try:
            response = _final_response(manager, url, options, deadline)
            return _read_body(response, options, deadline), response.status
        except (BlockedAddress, HTTPError) as exc:
            raise _failure(exc, url, options, deadline, response) from None
        finally:
            if response is not None:
                _discard(response)


def _final_response(
    manager: GuardedPoolManager, url: str, options: FetchOptions, deadline: Deadline
) -> BaseHTTPResponse:
    """The successful response for `url` after redirects (every hop checked) and retries."""
    redirect: tuple[str, int] | None = None  # the Location and status of the last redirect
    for _ in range(options.max_redirects + 1):
        try:
            response = _get_with_retries(manager, url, options, deadline)
        except LocationValueError as exc:  # urllib3 refused the URL: its port or host name
            if redirect is None:
                raise
            raise _bad_location(*redirect, exc) from None
        location = response.get_redirect_location()
        if not location:
            if response.status >= 300:
                _discard(response)
                raise _http_failure(response)
            return response
        _discard(response)
        redirect = (location, response.status)
        try:
            url = urljoin(url, location)
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise _bad_location(*redirect, exc) from None
        if scheme not in ("http", "https") or scheme not in options.schemes:
            raise RowFailure("blocked", f"redirect to {url[:200]!r} refused", response.status)
    raise RowFailure(
        "http_redirects", f"more than {options.max_redirects} redirects", response.status
    )


def _bad_location(location: str, status: int, exc: Exception) -> RowFailure:
    """The `bad_url` failure for a redirect whose Location is malformed."""
    return RowFailure(
        "bad_url", f"malformed redirect Location {location[:200]!r}: {exc}"[:300], status
    )


def _get_with_retries(
    manager: GuardedPoolManager, url: str, options: FetchOptions, deadline: Deadline
) -> BaseHTTPResponse:
    """One GET (redirects not followed), retried with backoff on 429/5xx and connection resets."""
    attempt = 0
    while True:
        try:
            response = manager.urlopen(
                "GET",
                url,
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=_timeout(options, deadline),
            )
        except ProtocolError as exc:  # reset or closed before any response
            delay = _backoff(attempt, options)
            if not _is_reset(exc) or attempt >= options.retries or delay >= deadline.remaining():
                raise
        else:
            if response.status not in _RETRIED_STATUSES:
                return response
            _discard(response)
            delay, why_not = _retry_delay(response, attempt, options, deadline)
            if attempt >= options.retries or why_not:
                tries = f" after {attempt + 1} attempt{'s' if attempt else ''}"
                raise _http_failure(response, why_not or tries)
        time.sleep(delay)
        attempt += 1


def _is_reset(exc: ProtocolError) -> bool:
    """True when the peer reset or closed the connection (not for malformed responses)."""
    return any(isinstance(arg, ConnectionError) for arg in exc.args)


def _timeout(options: FetchOptions, deadline: Deadline) -> Timeout:
    remaining = deadline.remaining()
    if remaining <= 0:
        raise RowFailure("timeout", f"deadline of {options.deadline:g} s passed")
    return Timeout(
        connect=min(options.connect_timeout, remaining), read=min(options.read_timeout, remaining)
    )


def _backoff(attempt: int, options: FetchOptions) -> float:
    """Exponential backoff with jitter, so that many workers do not retry in step."""
    return options.backoff * 2**attempt * _jitter.uniform(0.5, 1.0)


def _retry_delay(
    response: BaseHTTPResponse, attempt: int, options: FetchOptions, deadline: Deadline
) -> tuple[float, str]:
    """Seconds to wait before retrying `response`, and why not to retry at all ('' to retry)."""
    delay = _backoff(attempt, options)
    header = response.headers.get("Retry-After")
    if header:
        try:
            delay = Retry.DEFAULT.parse_retry_after(header)
        except (InvalidHeader, ValueError, OverflowError):
            pass  # unparseable, or a date past year 9999: keep the backoff
        else:
            if delay > options.max_retry_after:
                return delay, (
                    f" (Retry-After {header.strip()[:40]} is beyond the "
                    f"{options.max_retry_after:g} s cap)"
                )
    if delay >= deadline.remaining():
        return delay, f" (no time left to retry within the {options.deadline:g} s deadline)"
    return delay, ""


def _read_body(response: BaseHTTPResponse, options: FetchOptions, deadline: Deadline) -> bytes:
    """The body, streamed: refused past `max_bytes` (never read further) or if not an image."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdecimal() and int(declared) > options.max_bytes:  # isdigit() takes '²'
        raise RowFailure(
            "too_large",
            f"Content-Length {declared} exceeds {options.max_bytes} bytes",
            response.status,
        )
    body = bytearray()
    sniffed = False
    while chunk := response.read1(min(_CHUNK_BYTES, options.max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > options.max_bytes:
            raise RowFailure(
                "too_large", f"body exceeds {options.max_bytes} bytes", response.status
            )
        if not sniffed and len(body) >= SNIFF_BYTES:
            sniffed = True
            if sniff_format(body) is None:
                raise RowFailure("not_image", NOT_IMAGE, response.status)
    if deadline.passed:  # the watchdog may have ended the body early
        raise RowFailure("timeout", f"deadline of {options.deadline:g} s passed", response.status)
    return bytes(body)


def _discard(response: BaseHTTPResponse) -> None:
    """Close a response not read to the end (its connection too) and give the slot back."""
    response.close()
    response.release_conn()


def _http_failure(response: BaseHTTPResponse, detail: str = "") -> RowFailure:
    code = response.status
    status = "http_5xx" if code >= 500 else f"http_{code}"
    return RowFailure(status, f"HTTP {code} {response.reason or ''}".strip() + detail, code)


def _failure(
    exc: Exception,
    url: str,
    options: FetchOptions,
    deadline: Deadline,
    response: BaseHTTPResponse | None,
) -> RowFailure:
    """The row status for an exception raised while connecting or reading, with a message in
    plain words: the host and what went wrong, never urllib3's reprs or class names."""
    code = response.status if response is not None else None
    if deadline.passed:
        return RowFailure("timeout", f"deadline of {deadline.seconds:g} s passed", code)
    if isinstance(exc, BlockedAddress):
        return RowFailure("blocked", str(exc))
    if isinstance(exc, NameResolutionError):
        return RowFailure("dns_error", _unresolved(exc))
    if isinstance(exc, NewConnectionError):  # safehttp's message names the host and why
        return RowFailure("connection_error", _message(exc))
    if isinstance(exc, ReadTimeoutError):
        return RowFailure("timeout", _read_timed_out(exc, options), code)
    if isinstance(exc, Urllib3Timeout):  # a connect timeout: safehttp's message names the host
        return RowFailure("timeout", _message(exc), code)
    if isinstance(exc, LocationValueError):
        return RowFailure("bad_url", _malformed(url, exc))
    if isinstance(exc, SSLError):
        return RowFailure("connection_error", _tls_failure(exc), code)
    if isinstance(exc, ProtocolError):
        reason = _protocol_reason(exc)
        if response is not None:
            return RowFailure("truncated", f"body ended early: {reason}"[:300], code)
        return RowFailure("connection_error", f"no response: {reason}"[:300], code)
    return RowFailure("connection_error", _message(exc), code)


def _message(exc: Exception) -> str:
    """urllib3's readable message, without the pool or connection it puts first."""
    text = next((arg for arg in reversed(exc.args) if isinstance(arg, str)), "") or str(exc)
    if isinstance(exc, NewConnectionError):
        text = text.removeprefix(f"{exc.conn}: ")
    elif isinstance(exc, PoolError):
        text = text.removeprefix(f"{exc.pool}: ")
    return plain(text)[:300]


def _unresolved(exc: NameResolutionError) -> str:
    cause = exc.__cause__  # safehttp raises it from the resolver's error
    reason = os_reason(cause) if isinstance(cause, OSError) else _message(exc)
    return f"cannot resolve host name {exc.conn.host!r}: {reason}"[:300]


def _read_timed_out(exc: ReadTimeoutError, options: FetchOptions) -> str:
    """'timed out after 20 s reading from HOST': the timeout urllib3 names, else the option."""
    named = re.search(r"timeout=(\d+(?:\.\d+)?)", str(exc))
    seconds = float(named.group(1)) if named else options.read_timeout
    pool = exc.pool
    host = getattr(pool, "host", None)
    if host is None:
        return f"timed out after {seconds:g} s reading the response"
    default = getattr(getattr(pool, "ConnectionCls", None), "default_port", None)
    return f"timed out after {seconds:g} s reading from {host_port(host, pool.port, default)}"


def _malformed(url: str, exc: LocationValueError) -> str:
    """'malformed URL 'URL': why' (urllib3 names the URL itself when its port is out of range)."""
    detail = str(exc).removeprefix("Failed to parse: ")
    if detail == url:
        detail = _port_problem(url)
    shown = f"malformed URL {url[:200]!r}"
    return f"{shown}: {plain(detail)}"[:300] if detail else shown


def _port_problem(url: str) -> str:
    """Why the port of `url` is unusable ('Port out of range 0-65535'), or ''."""
    try:
        _ = urlsplit(url).port
    except ValueError as exc:
        return str(exc)
    return ""


def _tls_failure(exc: SSLError) -> str:
    """'TLS certificate not trusted: self-signed certificate', 'TLS error: wrong version number'."""
    inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), exc.__cause__)
    verify = getattr(inner, "verify_message", None)
    if verify:
        return f"TLS certificate not trusted: {plain(verify)}"[:300]
    reason = getattr(inner, "reason", None)
    if isinstance(reason, str) and reason:
        return f"TLS error: {reason.lower().replace('_', ' ')}"[:300]
    detail = _message(exc) if inner is None else plain(_SSL_NOISE.sub("", str(inner)))
    return f"TLS error: {detail}"[:300]


def _protocol_reason(exc: ProtocolError) -> str:
    """Why a connection broke: 'connection reset by peer', '430 bytes read, 430 more
    expected', 'remote end closed connection without response'."""
    inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
    if isinstance(inner, InvalidChunkLength):
        return "malformed chunked body (a chunk size line is not a number)"
    if isinstance(inner, http.client.IncompleteRead):  # urllib3's counts bytes, http's has them
        partial = inner.partial if isinstance(inner.partial, int) else len(inner.partial)
        if inner.expected is None:
            return f"{partial} bytes read"
        return f"{partial} bytes read, {inner.expected} more expected"
    if isinstance(inner, OSError):
        return os_reason(inner)
    if isinstance(inner, http.client.HTTPException):
        detail = str(inner)
        if isinstance(inner, http.client.BadStatusLine):
            return f"not an HTTP response (it starts {detail.strip()[:80]!r})"
        return plain(detail) if detail else "malformed HTTP response"
    return _message(exc)


# Opening a FIFO for reading waits for a writer, and a terminal could become ours: neither.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_BINARY", 0)
)


def _read_file(path: str, options: FetchOptions) -> bytes:
    """A regular file's bytes, at most `max_bytes`; abandoned after its first bytes if they
    are not an image. Directories, devices, FIFOs and sockets are refused (`not_a_file`)
    from `stat`, before they are opened: /dev/zero or a FIFO is never read."""
    try:
        if options.root:
            root = os.path.realpath(options.root)
            path = os.path.realpath(path)
            if os.path.commonpath([root, path]) != root:
                raise RowFailure("blocked", f"{path} is outside the root {root}")
        _check_regular(os.stat(path), path, options)
        with open(os.open(path, _OPEN_FLAGS), "rb") as f:
            _check_regular(os.fstat(f.fileno()), path, options)  # swapped since the stat?
            head = f.read(SNIFF_BYTES)
            if sniff_format(head) is None:
                raise RowFailure("not_image", NOT_IMAGE)
            data = head + f.read(options.max_bytes + 1 - len(head))
        if len(data) > options.max_bytes:
            raise RowFailure("too_large", f"file grew past {options.max_bytes} bytes")
        return data
    except (FileNotFoundError, NotADirectoryError):  # `a.jpg/b.jpg` where a.jpg is a file
        raise RowFailure("not_found", f"no such file: {path}") from None
    except OSError as exc:
        raise RowFailure("io_error", f"cannot read {path}: {os_reason(exc)}"[:300]) from None
    except ValueError as exc:  # a NUL byte, or a character no file name can encode
        raise RowFailure("bad_url", f"malformed path {path[:200]!r}: {exc}"[:300]) from None


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(info: os.stat_result, path: str, options: FetchOptions) -> None:
    """`not_a_file` unless `info` is a regular file; `too_large` when it is over the cap."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
        raise RowFailure("not_a_file", f"{path} is {kind}, not a regular file")
    if info.st_size > options.max_bytes:
        raise RowFailure("too_large", f"file is {info.st_size} bytes, over {options.max_bytes}")


def _fetch_one(
    url: str, options: FetchOptions, ingest_error: str = ""
) -> tuple[np.ndarray | None, dict]:
    record: dict = {
        "status": OK,
        "error": "",
        "http_status": None,
        "bytes": None,
        "sha256": "",
        "width": None,
        "height": None,
    }
    try:
        if ingest_error:  # a ragged CSV row: its fields cannot be trusted, so no fetch
            raise RowFailure("bad_row", ingest_error)
        data, http_status = read_source(url, options)
        record["http_status"] = http_status
        # `bytes` and `sha256` describe a whole body that was read: the readers abandon a
        # non-image after its first bytes (this catches shorter ones), so it has neither
        if sniff_format(data) is None:
            raise RowFailure("not_image", NOT_IMAGE)
        record["bytes"] = len(data)
        record["sha256"] = hashlib.sha256(data).hexdigest()
        pixels, record["width"], record["height"], thumbnail = decode_image(
            data,
            options.image_size,
            options.max_pixels,
            thumbnail=options.thumbnails,
            trim_borders=options.trim_borders,
        )
        if options.thumbnails:
            record[THUMBNAIL] = thumbnail
        return pixels, record
    except RowFailure as failure:
        record["status"] = failure.status
        record["error"] = str(failure)
        if failure.http_status is not None:
            record["http_status"] = failure.http_status
        return None, record


def fetch_partition(rows: pd.DataFrame, url_col: str, options: FetchOptions) -> FetchedPartition:
    """Fetch and decode every row of a partition concurrently; failures become statuses.

    Rows flagged by ingest (`INGEST_ERROR`, e.g. too many fields) become `bad_row`.
    """
    started = time.perf_counter()
    urls = rows[url_col].astype(str).tolist()
    flags = rows[INGEST_ERROR].tolist() if INGEST_ERROR in rows else [""] * len(urls)
    results = list(_pool(options.threads).map(lambda u, f: _fetch_one(u, options, f), urls, flags))
    table = rows.drop(columns=[INGEST_ERROR], errors="ignore")
    records = pd.DataFrame([record for _, record in results], index=table.index)
    for column in STATUS_COLUMNS:
        table[column] = records[column]
    if options.thumbnails:  # bytes of ok rows, None (null) of the others
        found = records[THUMBNAIL] if THUMBNAIL in records else pd.Series(None, index=table.index)
        kept = found.where(table["status"] == OK, None)  # binary even when all are null
        table[THUMBNAIL] = pd.array(kept.tolist(), dtype=pd.ArrowDtype(pa.binary()))
    table["http_status"] = table["http_status"].astype("Int16")
    for column in ("bytes", "width", "height"):
        table[column] = table[column].astype("Int64")
    size = options.image_size
    decoded = [pixels for pixels, _ in results if pixels is not None]
    pixels = np.stack(decoded) if decoded else np.zeros((0, size, size, 3), np.uint8)
    return FetchedPartition(table, pixels, time.perf_counter() - started)
