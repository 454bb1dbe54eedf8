"""One HTTP server on 127.0.0.1 for every test: a directory's files plus fault endpoints.

`LoopbackServer(directory)` serves the files under `directory` (as SimpleHTTPRequestHandler
does) and, on the paths below, faults instead. A path's first segment names its fault:

    /status/CODE          an empty response with status CODE
    /slow/SECONDS         a 200 after SECONDS, no body
    /flaky/FILE           503 while `server.down` is set, else FILE from the directory
    /image                a small JPEG
    /missing              404
    /error-then-ok        500 on the first request to the path, then the JPEG
    /always-503           503
    /busy-then-ok?after=S 429 with Retry-After S, then the JPEG
    /reset-then-ok        connection reset (RST) before any response, then the JPEG
    /silent               accepts and never answers
    /trickle-headers      a status line, then a header one byte per 50 ms
    /trickle-body         headers announcing 10 MB, then a byte per 50 ms
    /half                 half of the JPEG that Content-Length announces, then close
    /html                 an HTML page labelled image/jpeg
    /bomb                 a decompression-bomb PNG (12,000 x 12,000 pixels, a few KiB)
    /odd-length           Content-Length '²' (isdigit() but not int()), body to the close
    /huge[?declared=1]    HUGE_BYTES, close-delimited (or declared); `server.sent` counts
    /loop                 a redirect to itself
    /redirect?to=URL      a redirect to URL

Paths in `server.gone` answer 404. `server.hits` counts requests per path (with its query).
"""

from __future__ import annotations

import functools
import io
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

HUGE_BYTES = 256 * 2**20


@functools.cache
def jpeg_bytes() -> bytes:
    """A 64 x 48 JPEG of a ramp: what `/image` serves."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64 * 48 * 3).astype(np.uint8).reshape(48, 64, 3)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side pixels (all black) that compresses to a few KiB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = (b"\x00" + bytes((side + 7) // 8)) * side
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


@functools.cache
def bomb_bytes() -> bytes:
    """What `/bomb` serves: 144 M pixels, over Pillow's 89.5 M warning limit, under its error."""
    return png_bomb(12_000)


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP (or, with `ssl_context`, HTTPS) server on 127.0.0.1, port chosen by the OS.

    `protocol` is the handler's protocol_version: "HTTP/1.0" (a connection per request, as
    SimpleHTTPRequestHandler) or "HTTP/1.1" (keep-alive, so that retries may reuse a
    connection). Use as a context manager, or `start()` and `close()`.
    """

    daemon_threads = True
    request_queue_size = 64  # every fault of a partition connects at once

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        protocol: str = "HTTP/1.0",
        ssl_context: ssl.SSLContext | None = None,
    ):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.directory = None if directory is None else str(directory)
        self.protocol_version = protocol
        self.scheme = "https" if ssl_context else "http"
        if ssl_context:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # body bytes the kernel accepted, per path
        self.finished: dict[str, threading.Event] = {}
        self.stop = threading.Event()  # ends the faults that wait (silent, trickle)
        self.down = threading.Event()  # while set, /flaky/ paths answer 503
        self.gone: set[str] = set()  # paths that answer 404
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self.shutdown()
        self.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def handle_error(self, request, client_address):  # clients hang up or time out on purpose
        pass


class _Handler(SimpleHTTPRequestHandler):
    server: LoopbackServer

    def __init__(self, request, client_address, server: LoopbackServer):
        self.protocol_version = server.protocol_version
        super().__init__(request, client_address, server, directory=server.directory or ".")

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        if self.server.directory is None:
            self.send_error(501, "Unsupported method ('HEAD')")
        else:
            super().do_HEAD()

    def do_GET(self):
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        with self.server.lock:
            self.server.hits[self.path] += 1
            hit = self.server.hits[self.path]
        name, _, arg = parts.path.strip("/").partition("/")
        fault = getattr(self, "fault_" + name.replace("-", "_"), None)
        if self.path in self.server.gone and not (name == "flaky" and self.server.down.is_set()):
            self.empty(404)
        elif fault is not None:
            fault(hit, query, arg)
        elif self.server.directory is not None:
            super().do_GET()
        else:
            self.empty(404)

    def empty(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def reply(
        self,
        code: int,
        body: bytes = b"",
        content_type: str = "image/jpeg",
        headers: dict | None = None,
    ):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def trickle(self, data: bytes):
        """Send `data` then a byte every 50 ms until the client goes or the server stops."""
        self.wfile.write(data)
        while not self.server.stop.wait(0.05):
            self.wfile.write(b"\x00")

    # -- the faults: fault_<first path segment>(hit number, query, rest of the path) --------

    def fault_status(self, hit, query, arg):
        self.empty(int(arg))

    def fault_slow(self, hit, query, arg):
        time.sleep(float(arg))
        self.send_response(200)
        self.end_headers()

    def fault_flaky(self, hit, query, arg):
        if self.server.down.is_set():
            self.empty(503)
        elif self.server.directory is not None:
            self.path = self.path.removeprefix("/flaky")
            super().do_GET()
        else:
            self.empty(404)

    def fault_image(self, hit, query, arg):
        self.reply(200, jpeg_bytes())

    def fault_missing(self, hit, query, arg):
        self.reply(404, b"not here", "text/plain")

    def fault_error_then_ok(self, hit, query, arg):
        self.reply(500, b"oops", "text/plain") if hit == 1 else self.reply(200, jpeg_bytes())

    def fault_always_503(self, hit, query, arg):
        self.reply(503, b"busy", "text/plain")

    def fault_busy_then_ok(self, hit, query, arg):
        if hit == 1:
            self.reply(429, b"slow down", "text/plain", {"Retry-After": query["after"]})
        else:
            self.reply(200, jpeg_bytes())

    def fault_reset_then_ok(self, hit, query, arg):
        if hit == 1:  # close with RST before any response
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        else:
            self.reply(200, jpeg_bytes())

    def fault_silent(self, hit, query, arg):
        self.server.stop.wait(30)

    def fault_trickle_headers(self, hit, query, arg):
        self.trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ")

    def fault_trickle_body(self, hit, query, arg):
        self.trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + jpeg_bytes()[:100])

    def fault_half(self, hit, query, arg):
        jpeg = jpeg_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(jpeg)))
        self.end_headers()
        self.wfile.write(jpeg[: len(jpeg) // 2])
        self.close_connection = True

    def fault_html(self, hit, query, arg):
        self.reply(200, b"<!doctype html><html><body>a page, not a photo</body></html>")

    def fault_bomb(self, hit, query, arg):
        self.reply(200, bomb_bytes(), "image/png")

    def fault_odd_length(self, hit, query, arg):
        """Content-Length '²' (str.isdigit() says yes, int() no): the body runs to the close."""
        self.send_response(200)
        self.send_header("Content-Length", "\xb2")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(jpeg_bytes())
        self.close_connection = True

    def fault_huge(self, hit, query, arg):
        """A body of HUGE_BYTES, close-delimited (no Content-Length) or declared."""
        self.send_response(200)
        if query.get("declared"):
            self.send_header("Content-Length", str(HUGE_BYTES))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = jpeg_bytes()[:16] + bytes(64 * 1024 - 16)
        try:
            while self.server.sent["/huge"] < HUGE_BYTES:
                self.wfile.write(block)
                self.server.sent["/huge"] += len(block)
        finally:
            self.server.finished.setdefault("/huge", threading.Event()).set()

    def fault_loop(self, hit, query, arg):
        self.reply(302, b"", "text/plain", {"Location": "/loop"})

    def fault_redirect(self, hit, query, arg):
        self.reply(302, b"", "text/plain", {"Location": query["to"]})
