"""HTTP for untrusted URLs: an address policy checked on the socket, and a hard deadline.

`GuardedPoolManager` is a urllib3 `PoolManager` whose connections resolve the host once,
check every address against an `AddressPolicy` and connect to a checked address. A hostname
that resolves (or re-resolves: DNS rebinding) to a refused address is therefore never
connected to, on the first request and on every redirect hop, and IP literals are checked
without asking the resolver at all.

`watched_deadline` bounds a whole fetch in wall-clock time: a watchdog thread shuts down the
socket of a fetch that runs past its deadline. That ends reads which per-read timeouts never
end (a server that trickles a byte at a time, in the headers or in the body).
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.util.connection import allowed_gai_family

# Cloud metadata services outside the link-local ranges: AWS IPv6, Alibaba Cloud.
METADATA_ADDRESSES = frozenset(
    map(
        ipaddress.ip_address,
        (
            "169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
        ),
    )
)


class BlockedAddress(Exception):
    """The address policy refuses a host: one of its addresses may not be connected to."""


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a fetch may connect to.

    The default refuses link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata
    endpoints only. Loopback and private ranges stay allowed because local users (and the
    tests) serve images from them; `public_only` refuses them too, for URL lists from
    untrusted parties. `allow_link_local` lifts the default refusal (not `public_only`).
    """

    allow_link_local: bool = False
    public_only: bool = False

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be connected to, or None when it may."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 reaches 169.254.169.254
        if not self.allow_link_local and (ip.is_link_local or ip in METADATA_ADDRESSES):
            return "a link-local or cloud metadata address"
        if self.public_only and (not ip.is_global or ip.is_multicast):
            return "not a public address"
        return None


def resolve_checked(host: str, port: int, policy: AddressPolicy) -> list[tuple]:
    """`getaddrinfo` results for `host`, once; BlockedAddress when any address is refused."""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # an IP literal: refuse it before the resolver is asked anything
        _check_address(host, host, policy)
    infos = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        _check_address(host, str(sockaddr[0]), policy)
    return infos


def _check_address(host: str, address: str, policy: AddressPolicy) -> None:
    reason = policy.refusal(address)
    if reason is not None:
        where = f"{address} is" if host == address else f"{host} resolves to {address},"
        raise BlockedAddress(f"refused to connect: {where} {reason}")


def host_port(host: str, port: int | None, default_port: int | None = None) -> str:
    """`host:port` as a URL writes it (`[::1]:8080`); the port left out when it is the default."""
    host = host.strip("[]")
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None or port == default_port else f"{shown}:{port}"


def os_reason(exc: BaseException) -> str:
    """An OS error's reason in plain words: 'connection refused', not
    "ConnectionRefusedError(111, 'Connection refused')" or '[Errno 111] ...'."""
    reason = getattr(exc, "strerror", None) or str(exc) or "no reason given"
    return plain(reason)


def plain(text: str) -> str:
    """A library's message as part of a sentence: its first letter lower case (unless it
    starts an acronym, as in 'HTTP'; all of it when Title Cased), no final period."""
    text = " ".join(str(text).split()).rstrip(".")
    if text.istitle():  # Pillow's 'Truncated File Read'
        text = text.lower()
    elif text[:1].isupper() and not text[1:2].isupper():
        text = text[0].lower() + text[1:]
    return text


# the mixin's methods use HTTPConnection's attributes: type-check it as one
if TYPE_CHECKING:
    _ConnectionBase = HTTPConnection
else:
    _ConnectionBase = object


class _GuardedConnectionMixin(_ConnectionBase):
    """Resolves once per connection, checks every address, connects to a checked one."""

    def __init__(self, *args, address_policy: AddressPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.address_policy = address_policy

    def _new_conn(self) -> socket.socket:
        try:
            infos = resolve_checked(self._dns_host, self.port, self.address_policy)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except UnicodeError:
            raise LocationParseError(f"{self.host!r} is not a valid host name") from None
        error: Exception | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            timeout = _within_current_deadline(self.timeout)
            where = host_port(self.host, self.port, self.default_port)
            if str(sockaddr[0]) != self.host.strip("[]"):
                where += f" ({sockaddr[0]})"
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(sockaddr)
            except TimeoutError:
                sock.close()
                after = "" if timeout is None else f" after {timeout:g} s"
                error = ConnectTimeoutError(self, f"timed out{after} connecting to {where}")
            except OSError as exc:
                sock.close()
                error = NewConnectionError(self, f"cannot connect to {where}: {os_reason(exc)}")
            else:
                _attach_to_current_deadline(sock)
                return sock
        assert error is not None  # getaddrinfo gives at least one address or raises
        raise error

    def request(self, *args, **kwargs) -> None:
        if self.sock is not None:  # a kept-alive connection, or one wrapped in TLS
            _attach_to_current_deadline(self.sock)
        super().request(*args, **kwargs)


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedPoolManager(PoolManager):
    """A urllib3 `PoolManager` whose connections obey an `AddressPolicy`.

    Environment proxies are not used: through a proxy the policy would check the proxy's
    address, not the image host's.
    """

    def __init__(self, policy: AddressPolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.pool_classes_by_scheme = {
            "http": _GuardedHTTPConnectionPool,
            "https": _GuardedHTTPSConnectionPool,
        }

    def _new_pool(self, scheme, host, port, request_context=None):
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["address_policy"] = self.policy
        return super()._new_pool(scheme, host, port, context)


class Deadline:
    """A wall-clock limit for one fetch; when it passes, the fetch's socket is shut down."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._expired = False
        self._socket: socket.socket | None = None

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    @property
    def passed(self) -> bool:
        return self._expired or self.remaining() <= 0

    def attach(self, sock: socket.socket | None) -> None:
        """Make `sock` the socket shut down at expiry (None: nothing to shut down)."""
        with self._lock:
            self._socket = sock
            if self._expired and sock is not None:
                _shutdown(sock)

    def expire(self) -> None:
        with self._lock:
            self._expired = True
            if self._socket is not None:
                _shutdown(self._socket)


def _shutdown(sock: socket.socket) -> None:
    """End any blocked read on `sock` (socket-level shutdown, also under TLS)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed already, or detached when it was wrapped in TLS
        pass


class _Watchdog:
    """One daemon thread per process that expires the deadlines of running fetches."""

    def __init__(self):
        self._wakeup = threading.Condition()
        self._deadlines: set[Deadline] = set()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._wakeup:
            earliest = min((d.expires_at for d in self._deadlines), default=math.inf)
            self._deadlines.add(deadline)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(
                    target=self._run, name="imgsim-deadlines", daemon=True
                )
                self._thread.start()
            elif deadline.expires_at < earliest:
                self._wakeup.notify()

    def unwatch(self, deadline: Deadline) -> None:
        with self._wakeup:
            self._deadlines.discard(deadline)

    def _run(self) -> None:
        with self._wakeup:
            while True:
                now = time.monotonic()
                for deadline in [d for d in self._deadlines if d.expires_at <= now]:
                    self._deadlines.discard(deadline)
                    deadline.expire()
                earliest = min((d.expires_at for d in self._deadlines), default=None)
                self._wakeup.wait(None if earliest is None else earliest - now)


_watchdog = _Watchdog()
_current = threading.local()


@contextmanager
def watched_deadline(seconds: float) -> Iterator[Deadline]:
    """A `Deadline` for the fetch this thread runs inside the block."""
    deadline = Deadline(seconds)
    _current.deadline = deadline
    _watchdog.watch(deadline)
    try:
        yield deadline
    finally:
        _watchdog.unwatch(deadline)
        deadline.attach(None)  # a late expiry must not shut a pooled keep-alive socket
        _current.deadline = None


def _within_current_deadline(timeout: float | None) -> float | None:
    """`timeout` shortened to what is left of this thread's deadline (many addresses, one limit)."""
    deadline = getattr(_current, "deadline", None)
    if deadline is None:
        return timeout
    remaining = max(deadline.remaining(), 0.001)
    return remaining if timeout is None else min(timeout, remaining)


def _attach_to_current_deadline(sock: socket.socket) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)
