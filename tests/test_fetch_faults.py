"""Fetching against a real fault-injecting HTTP server on 127.0.0.1, and the address guard.

Every fault (support/http.py serves them) ends as its own row status within a bounded
time. The link-local / metadata guard is tested through a patched resolver: no test sends a
packet anywhere but loopback (the conftest guard fails any other connect; `connects` below
records every attempt).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import quote

import pandas as pd
import pytest
import urllib3

from imgsim_dask.errors import InputError
from imgsim_dask.fetch import fetch_partition
from imgsim_dask.options import FetchOptions
from imgsim_dask.safehttp import AddressPolicy, BlockedAddress, GuardedPoolManager
from imgsim_dask.schema import OK

from support.http import HUGE_BYTES, LoopbackServer, jpeg_bytes

METADATA_IP = "169.254.169.254"
CAP_BYTES = 2**20
JPEG = jpeg_bytes()  # what the fault server's /image serves


@dataclass
class FakeDns:
    """Answers for test host names (all addresses at once); other names go to the guard.

    `later` answers replace `answers` from the second lookup on (DNS rebinding);
    `calls` counts lookups per name.
    """

    answers: dict[str, list[str] | Exception] = field(default_factory=dict)
    later: dict[str, list[str]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)


@pytest.fixture
def dns(monkeypatch) -> FakeDns:
    fake = FakeDns()
    guarded_getaddrinfo = socket.getaddrinfo  # the conftest guard: loopback names only

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in fake.answers:
            return guarded_getaddrinfo(host, port, *args, **kwargs)
        fake.calls[host] += 1
        answer = fake.answers[host]
        if isinstance(answer, Exception):
            raise answer
        if fake.calls[host] > 1:
            answer = fake.later.get(host, answer)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answer
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


@pytest.fixture
def connects(monkeypatch) -> list[str]:
    """Every address a socket tries to connect to. Non-loopback ones are refused, unsent."""
    attempts: list[str] = []
    guarded_connect = socket.socket.connect  # the conftest guard

    def connect(sock, address):
        attempts.append(address[0])
        if not address[0].startswith("127."):
            raise ConnectionRefusedError(f"test refused a connection to {address[0]}")
        return guarded_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def fetch(urls: list[str], **options) -> tuple[pd.DataFrame, float]:
    """Fetch `urls` as one partition; the row table and the seconds it took."""
    started = time.perf_counter()
    fetched = fetch_partition(pd.DataFrame({"url": urls}), "url", FetchOptions(**options))
    return fetched.rows, time.perf_counter() - started


FAST = {"backoff": 0.05, "connect_timeout": 1.0, "read_timeout": 1.0, "deadline": 3.0}


@dataclass(frozen=True)
class Fault:
    path: str
    status: str
    hits: int  # requests the server saw: retries or not
    max_seconds: float
    options: dict = field(default_factory=dict)
    min_seconds: float = 0.0  # a wait that must happen (Retry-After, the deadline)


FAULTS = {
    "served image": Fault("/image", OK, 1, 2),
    "404 is not retried": Fault("/missing", "http_404", 1, 2),
    "500 then 200 ends ok": Fault("/error-then-ok", OK, 2, 2),
    "503 every time: bounded retries": Fault("/always-503", "http_5xx", 3, 2),
    "429 Retry-After 1 s is honoured": Fault("/busy-then-ok?after=1", OK, 2, 2, min_seconds=1),
    "429 Retry-After beyond the cap": Fault("/busy-then-ok?after=3600", "http_429", 1, 1),
    "429 Retry-After past year 9999: the backoff": Fault(
        "/busy-then-ok?after=Fri,%2031%20Dec%2010000%2000:00:00%20GMT", OK, 2, 2
    ),
    "reset before a response is retried": Fault("/reset-then-ok", OK, 2, 2),
    "server never answers": Fault("/silent", "timeout", 1, 2, {"read_timeout": 0.5}),
    # read_timeout (1 s) never fires on a trickle: the deadline ends it
    "headers trickle forever": Fault(
        "/trickle-headers", "timeout", 1, 2.5, {"deadline": 1.5}, min_seconds=1.5
    ),
    "body trickles forever": Fault(
        "/trickle-body", "timeout", 1, 2.5, {"deadline": 1.5}, min_seconds=1.5
    ),
    "half the declared body, then close": Fault("/half", "truncated", 1, 2),
    "Content-Length not a number": Fault("/odd-length", OK, 1, 2),
    "HTML served as image/jpeg": Fault("/html", "not_image", 1, 2),
    "decompression bomb PNG": Fault("/bomb", "bomb", 1, 3),
    "redirect loop": Fault("/loop", "http_redirects", 6, 2),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_fault_gets_its_status_in_bounded_time(fault_server, fault):
    rows, seconds = fetch([fault_server.url(fault.path)], **{**FAST, **fault.options})
    row = rows.iloc[0]
    assert row["status"] == fault.status, row["error"]
    assert (row["error"] == "") == (fault.status == OK)
    assert_plain(row["error"])
    assert fault_server.hits[fault.path] == fault.hits
    assert fault.min_seconds <= seconds < fault.max_seconds


@pytest.mark.parametrize("declared", [False, True], ids=["streamed", "content-length"])
def test_body_over_the_cap_is_never_read_past_it(fault_server, monkeypatch, declared):
    read = Counter()
    real_read1 = urllib3.response.HTTPResponse.read1

    def counting_read1(self, *args, **kwargs):
        data = real_read1(self, *args, **kwargs)
        read["bytes"] += len(data)
        return data

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read1", counting_read1)
    url = fault_server.url("/huge" + ("?declared=1" if declared else ""))
    rows, seconds = fetch([url], **{**FAST, "max_bytes": CAP_BYTES})
    assert rows["status"].tolist() == ["too_large"] and seconds < 2
    assert read["bytes"] <= (0 if declared else CAP_BYTES + 1)
    assert fault_server.finished.setdefault("/huge", threading.Event()).wait(5)
    # the client hung up; only socket buffers filled
    assert fault_server.sent["/huge"] < HUGE_BYTES // 4


def test_refused_connection():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows, seconds = fetch([f"http://127.0.0.1:{port}/a.jpg"], **FAST)
    assert rows["status"].tolist() == ["connection_error"] and seconds < 1
    # was "NewConnectionError: _GuardedHTTPConnection(host='127.0.0.1', port=...): ..."
    assert rows.loc[0, "error"] == f"cannot connect to 127.0.0.1:{port}: connection refused"


# what a row's error must never show: class names, reprs, errno or OpenSSL noise
UGLY = re.compile(r"\w+(Error|Exception)\b|\w\(|<\w[^>]*>|Errno|0x[0-9a-f]{6,}|_ssl\.c|Failed to")


def assert_plain(error: str) -> None:
    assert not UGLY.search(error), error
    assert "\n" not in error and len(error) <= 300, error


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_row_errors_say_what_went_wrong_in_plain_words(fault_server, dns, monkeypatch):
    """urllib3's exceptions once reached the row table as they print: class names and the
    connection's repr ("_GuardedHTTPConnection(host='127.0.0.1', port=1): ...")."""
    port, server = closed_port(), fault_server.port
    dns.answers["no-such-host.test"] = socket.gaierror(socket.EAI_NONAME, "Name not known")
    expected = {
        f"http://localhost:{port}/a.jpg": (
            "connection_error",
            f"cannot connect to localhost:{port} (127.0.0.1): connection refused",
        ),
        "http://no-such-host.test/a.jpg": (
            "dns_error",
            "cannot resolve host name 'no-such-host.test': name not known",
        ),
        fault_server.url("/silent"): (
            "timeout",
            f"timed out after 0.5 s reading from 127.0.0.1:{server}",
        ),
        fault_server.url("/half"): (
            "truncated",
            f"body ended early: {len(JPEG) // 2} bytes read, "
            f"{len(JPEG) - len(JPEG) // 2} more expected",
        ),
        fault_server.url("/reset-then-ok?no-retry"): (  # a FIN, or the RST after it
            "connection_error",
            {
                "no response: remote end closed connection without response",
                "no response: connection reset by peer",
            },
        ),
        f"https://127.0.0.1:{server}/image": (
            "connection_error",
            "TLS error: wrong version number",
        ),
        "http://127.0.0.1:99999/a.jpg": (
            "bad_url",
            "malformed URL 'http://127.0.0.1:99999/a.jpg': port out of range 0-65535",
        ),
    }
    rows, _ = fetch(list(expected), **{**FAST, "read_timeout": 0.5, "retries": 0})
    for (url, (status, error)), row in zip(expected.items(), rows.itertuples()):
        assert row.status == status, (url, row.error)
        assert row.error in (error if isinstance(error, set) else {error}), url
        assert_plain(row.error)

    def unanswered_connect(sock, address):  # nothing is sent
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket.socket, "connect", unanswered_connect)
    rows, _ = fetch([f"http://localhost:{port}/a.jpg"], **FAST)
    assert rows["status"].tolist() == ["timeout"]
    assert rows.loc[0, "error"] == f"timed out after 1 s connecting to localhost:{port} (127.0.0.1)"


def test_an_untrusted_certificate_is_named_plainly(tmp_path):
    pytest.importorskip("cryptography.x509")
    from support.certs import CertificateAuthority

    server_pem, _ = (
        CertificateAuthority("not a public CA")
        .issue("localhost", dns_names=["localhost"], server_auth=True)
        .write(tmp_path / "server.pem")
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem)
    with LoopbackServer(ssl_context=context) as tls_server:
        rows, _ = fetch([f"https://localhost:{tls_server.port}/image"], **FAST)
    assert rows["status"].tolist() == ["connection_error"]
    assert rows.loc[0, "error"].startswith("TLS certificate not trusted: ")
    assert_plain(rows.loc[0, "error"])


def test_an_unreadable_file_is_named_plainly(tmp_path, monkeypatch):
    image = tmp_path / "a.jpg"
    image.write_bytes(JPEG)
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path) == str(image):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    rows, _ = fetch([str(image)])
    assert rows["status"].tolist() == ["io_error"]
    assert rows.loc[0, "error"] == f"cannot read {image}: permission denied"


def test_deadline_bounds_connects_to_many_unreachable_addresses(dns, monkeypatch):
    dns.answers["blackhole.test"] = [f"127.0.0.{i}" for i in range(2, 12)]

    def unanswered_connect(sock, address):  # a host that drops SYNs; nothing is sent
        time.sleep(sock.gettimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket.socket, "connect", unanswered_connect)
    rows, seconds = fetch(["http://blackhole.test/a.jpg"], **{**FAST, "deadline": 1.5})
    assert rows["status"].tolist() == ["timeout"] and seconds < 2.5  # not 10 x connect_timeout


def test_unresolvable_host(dns, connects):
    dns.answers["no-such-host.test"] = socket.gaierror(socket.EAI_NONAME, "Name not known")
    rows, seconds = fetch(["http://no-such-host.test/a.jpg"], **FAST)
    assert rows["status"].tolist() == ["dns_error"] and seconds < 1
    assert connects == []


def test_metadata_hostname_is_blocked_before_any_connect(dns, connects):
    dns.answers["metadata.test"] = [METADATA_IP]
    rows, _ = fetch(["http://metadata.test/latest/meta-data/iam/"], **FAST)
    assert rows["status"].tolist() == ["blocked"]
    assert "169.254.169.254" in rows.loc[0, "error"]
    assert connects == []


@pytest.mark.parametrize(
    "answer",
    [["fe80::1"], ["127.0.0.1", METADATA_IP]],
    ids=["ipv6-link-local", "one-of-two-addresses"],
)
def test_hosts_resolving_to_link_local_are_blocked(dns, connects, answer):
    dns.answers["sneaky.test"] = answer
    rows, _ = fetch(["http://sneaky.test/a.jpg"], **FAST)
    assert rows["status"].tolist() == ["blocked"] and connects == []


@pytest.mark.parametrize(
    "host",
    [METADATA_IP, "[fe80::1]", "[::ffff:169.254.169.254]", "[fd00:ec2::254]", "100.100.100.200"],
)
def test_link_local_and_metadata_literals_are_blocked(connects, host):
    rows, _ = fetch([f"http://{host}/latest/meta-data/"], **FAST)
    assert rows["status"].tolist() == ["blocked"] and connects == []


@pytest.mark.parametrize(
    "target",
    [
        "http://metadata.test/latest/meta-data/",
        f"http://{METADATA_IP}/latest/meta-data/",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_metadata_or_a_file_is_blocked(fault_server, dns, connects, target):
    dns.answers["metadata.test"] = [METADATA_IP]
    rows, _ = fetch([fault_server.url(f"/redirect?to={target}")], **FAST)
    assert rows["status"].tolist() == ["blocked"]
    assert sum(fault_server.hits.values()) == 1
    assert connects and all(address == "127.0.0.1" for address in connects)


@pytest.mark.parametrize(
    "target",
    ["http://[::1/x.jpg", "//[zz]/x.jpg", "http://127.0.0.1:99999/x.jpg"],
    ids=["unclosed-bracket", "not-an-ip-in-brackets", "port-out-of-range"],
)
def test_malformed_redirect_location_is_bad_url(fault_server, connects, target):
    urls = [
        fault_server.url("/image"),
        fault_server.url("/redirect?to=" + quote(target, safe="")),
        fault_server.url("/image"),
    ]
    rows, _ = fetch(urls, **FAST)
    assert rows["status"].tolist() == [OK, "bad_url", OK]
    assert "malformed redirect Location" in rows.loc[1, "error"]
    assert rows.loc[1, "http_status"] == 302
    assert set(connects) == {"127.0.0.1"}


def test_host_names_with_empty_or_long_labels_are_bad_url_before_any_lookup(
    fault_server, monkeypatch
):
    guarded_getaddrinfo = socket.getaddrinfo  # the conftest guard: loopback names only

    def getaddrinfo(host, *args, **kwargs):
        host.encode("idna")  # as CPython's getaddrinfo does before asking the resolver
        return guarded_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    urls = [
        "http://a..b/x.jpg",
        f"http://{'a' * 64}.test/x.jpg",
        fault_server.url("/redirect?to=http://a..b/x.jpg"),
        fault_server.url("/image"),
    ]
    rows, _ = fetch(urls, **FAST)
    assert rows["status"].tolist() == ["bad_url", "bad_url", "bad_url", OK]
    assert "malformed redirect Location 'http://a..b/x.jpg'" in rows.loc[2, "error"]


def test_resolved_once_and_connected_to_the_checked_address(fault_server, dns, connects):
    """DNS rebinding: a second lookup would answer 169.254.169.254; there is none."""
    dns.answers["rebind.test"] = ["127.0.0.1"]
    dns.later["rebind.test"] = [METADATA_IP]
    port = fault_server.server_address[1]
    urls = [f"http://rebind.test:{port}/image"] * 3
    rows, _ = fetch(urls, **FAST, threads=1)
    assert rows["status"].tolist() == [OK] * 3
    assert dns.calls["rebind.test"] == 1 and connects == ["127.0.0.1"]  # kept alive


def test_allow_link_local_lifts_the_block(dns, connects):
    dns.answers["metadata.test"] = [METADATA_IP]
    rows, _ = fetch(["http://metadata.test/latest/"], **FAST, allow_link_local=True)
    assert rows["status"].tolist() == ["connection_error"]  # the spy refused it, unsent
    assert connects == [METADATA_IP]


def test_public_only_refuses_loopback(fault_server, connects):
    port = fault_server.server_address[1]
    urls = [
        fault_server.url("/image"),
        f"http://localhost:{port}/image",
        f"http://[::1]:{port}/image",
    ]
    rows, _ = fetch(urls, **FAST, public_only=True)
    assert rows["status"].tolist() == ["blocked"] * 3
    assert connects == [] and fault_server.hits["/image"] == 0


def test_scheme_allow_list(fault_server, tmp_path, connects):
    """A well-formed scheme that is not allowed (or never fetched: ftp, data) is `blocked`,
    before anything is resolved or connected to; only a malformed URL is `bad_url`."""
    image = tmp_path / "a.jpg"
    image.write_bytes(JPEG)
    urls = [
        fault_server.url("/image"),
        str(image),
        f"file://{image}",
        "ftp://127.0.0.1/a.jpg",
        "data:image/jpeg;base64,/9j/4AAQ",
        "http://[::1/a.jpg",
    ]
    rows, _ = fetch(urls, schemes=("https",))
    assert rows["status"].tolist() == ["blocked"] * 5 + ["bad_url"]
    assert "ftp URLs are not fetched" in rows.loc[3, "error"]
    assert connects == [] and fault_server.hits["/image"] == 0
    rows, _ = fetch(urls, schemes=("http", "file"))
    assert rows["status"].tolist() == [OK, OK, OK, "blocked", "blocked", "bad_url"]


def test_public_only_refuses_local_files_without_opening_them(tmp_path, monkeypatch):
    """`public_only` is for CSVs from untrusted parties: a path or file:// URL (/etc/shadow)
    is `blocked` without being opened, and leaves no size or hash in the row table, also
    when `file` is listed in `schemes` (as the CLI's --schemes default does). Like
    allow_link_local, no allowance lifts public_only: `file` is dropped from the options,
    so they (and plan.json, which records them) say what is fetched."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$salt$hash:19000:0:99999:7:::\n")
    image = tmp_path / "a.jpg"
    image.write_bytes(JPEG)
    touched = []
    for name in ("stat", "open", "lstat"):
        real = getattr(os, name)

        def spy(path, *args, _real=real, **kwargs):
            if str(tmp_path) in str(path):
                touched.append(str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    urls = [str(secret), f"file://{secret}", str(image), "a.jpg", f"file://localhost{image}"]
    for schemes in (("http", "https", "file"), ("http", "https")):
        options = FetchOptions(public_only=True, schemes=schemes, base_dir=str(tmp_path))
        assert options.schemes == ("http", "https")
        assert FetchOptions(**asdict(options)) == options  # as driver.py rebuilds them
        rows, _ = fetch(urls, public_only=True, schemes=schemes, base_dir=str(tmp_path))
        assert rows["status"].tolist() == ["blocked"] * len(urls)
        assert rows["error"].str.contains("local files are not fetched with public_only").all()
        assert rows["bytes"].isna().all() and (rows["sha256"] == "").all()
    assert touched == []
    with pytest.raises(InputError, match="public_only refuses local files"):
        FetchOptions(public_only=True, schemes=("file",))
    rows, _ = fetch(urls[2:], base_dir=str(tmp_path))  # without public_only: read
    assert rows["status"].tolist() == [OK] * 3


def test_root_confines_local_paths(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "in.jpg").write_bytes(JPEG)
    (outside / "out.jpg").write_bytes(JPEG)
    (root / "escape.jpg").symlink_to(outside / "out.jpg")
    urls = ["in.jpg", "../outside/out.jpg", "escape.jpg", str(outside / "out.jpg")]
    rows, _ = fetch(urls, root=str(root), base_dir=str(root))
    assert rows["status"].tolist() == [OK, "blocked", "blocked", "blocked"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_fault_in_one_partition_finishes_in_bounded_time(fault_server):
    """All faults at once, as a worker meets them: one status each, the slowest bounds the run."""
    urls = [fault_server.url(fault.path) for fault in FAULTS.values()]
    rows, seconds = fetch(urls, **{**FAST, "read_timeout": 0.5, "deadline": 1.5})
    assert rows["status"].tolist() == [fault.status for fault in FAULTS.values()]
    assert seconds < 4


def test_https_connects_to_the_checked_address_and_verifies_the_host_name(tmp_path, dns, connects):
    """TLS on a guarded connection: the socket goes to the checked IP, the certificate is
    verified against the URL's host name, and a metadata host is refused before any connect."""
    pytest.importorskip("cryptography.x509")
    from support.certs import CertificateAuthority

    ca = CertificateAuthority("imgsim test CA")
    ca_file = ca.write(tmp_path / "ca.pem")
    server_pem, _ = ca.issue("images.test", dns_names=["images.test"], server_auth=True).write(
        tmp_path / "server.pem"
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem)
    tls_server = LoopbackServer(protocol="HTTP/1.1", ssl_context=context).start()
    port = tls_server.port
    dns.answers.update(
        {
            "images.test": ["127.0.0.1"],
            "impostor.test": ["127.0.0.1"],
            "metadata.test": [METADATA_IP],
        }
    )
    manager = GuardedPoolManager(AddressPolicy(), ca_certs=str(ca_file))
    try:
        response = manager.urlopen("GET", f"https://images.test:{port}/image", retries=False)
        assert response.status == 200 and response.data == JPEG
        with pytest.raises(urllib3.exceptions.SSLError):  # certificate is for images.test
            manager.urlopen("GET", f"https://impostor.test:{port}/image", retries=False)
        with pytest.raises(BlockedAddress):
            manager.urlopen("GET", f"https://metadata.test:{port}/", retries=False)
    finally:
        tls_server.close()
    assert connects == ["127.0.0.1", "127.0.0.1"]
