"""A TLS cluster started as users start one: `dask scheduler` + `dask worker` processes on 127.0.0.1.

Certificates are made here: a cluster CA signs the scheduler/worker certificate and the
client's; a second CA signs an impostor's. The whole `imgsim run` goes over TLS; clients
without a certificate from the cluster CA are refused; the pre-flight check names what a
cluster lacks within seconds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client
from distributed.security import Security

from imgsim_dask import ClusterOptions, ImgsimError, extract, open_store
from imgsim_dask.cluster import _check_versions, connect


def _write_ca(root: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = root / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _write_leaf(root: Path, name: str, ca) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca`, valid for 127.0.0.1; returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert, ca_key, _ = ca
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = root / f"{name}.pem", root / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """Paths: `ca`, `cluster`/`cluster-key`, `client`/`client-key`, and an impostor's pair."""
    root = tmp_path_factory.mktemp("tls")
    ca = _write_ca(root, "cluster-ca")
    other_ca = _write_ca(root, "other-ca")
    files = {"ca": ca[2], "other-ca": other_ca[2]}
    for name, signer in (("cluster", ca), ("client", ca), ("impostor", other_ca)):
        files[name], files[f"{name}-key"] = _write_leaf(root, name, signer)
    return files


def _tls_args(certs, role: str) -> list[str]:
    return ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs[role]),
            "--tls-key", str(certs[f"{role}-key"])]


def client_options(certs, scheduler_file: Path | None, **fields) -> ClusterOptions:
    return ClusterOptions(scheduler_file=str(scheduler_file) if scheduler_file else None,
                          tls_ca_file=str(certs["ca"]),
                          tls_cert=str(certs["client"]), tls_key=str(certs["client-key"]),
                          **fields)


class ProcessCluster:
    """`dask scheduler` and `dask worker` processes over TLS, logging to one file."""

    def __init__(self, root: Path, certs: dict[str, Path]):
        self.root, self.certs, self.processes = root, certs, []
        self.scheduler_file = root / "scheduler.json"
        self.env = {**os.environ, "KERAS_HOME": str(root / "worker-keras"),
                    "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.log = open(root / "cluster.log", "w")

    def start(self, module: str, *args: str) -> None:
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", f"distributed.cli.{module}", *args,
             *_tls_args(self.certs, "cluster")],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT))

    def start_scheduler(self) -> str:
        self.start("dask_scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                   "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                   str(self.scheduler_file))
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return json.loads(self.scheduler_file.read_text())["address"]

    def add_worker(self, *options: str) -> None:
        self.start("dask_worker", "--scheduler-file", str(self.scheduler_file), "--host",
                   "127.0.0.1", "--no-dashboard", *options)

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers to the end, then the scheduler
            process.terminate()
            process.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    """A TLS scheduler, one model worker (GPU=1, one thread) and one fetch worker (NET=2)."""
    cluster = ProcessCluster(tmp_path_factory.mktemp("tls-cluster"), certs)
    try:
        cluster.address = cluster.start_scheduler()
        cluster.add_worker("--nthreads", "1", "--resources", "GPU=1")
        cluster.add_worker("--nthreads", "2", "--resources", "NET=2")
        with connect(options=client_options(certs, cluster.scheduler_file)) as client:
            client.wait_for_workers(2, timeout=120)
        yield cluster
    finally:
        cluster.stop()


def test_whole_run_over_tls(tls_cluster, certs, http_server, tmp_path):
    """`imgsim run` with --scheduler-file and the client certificate: extract both, match."""
    pd.DataFrame({"id": ["a", "b", "c"], "url": [f"{http_server}/{n}.jpg" for n in
                                                ("astronaut", "chelsea", "coffee")]}) \
        .to_csv(tmp_path / "catalogue.csv", index=False)
    pd.DataFrame({"id": ["x", "y"], "url": [f"{http_server}/chelsea_small.png",
                                            f"{http_server}/missing.jpg"]}) \
        .to_csv(tmp_path / "uploads.csv", index=False)
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "imgsim_dask", "run", tmp_path / "uploads.csv",
         tmp_path / "catalogue.csv", "--store", store, "--weights", "random", "--top-k", "1",
         "--partition-rows", "2", "--batch-size", "2", "--out", tmp_path / "matches.csv",
         "--no-progress", "--scheduler-file", tls_cluster.scheduler_file,
         *_tls_args(certs, "client")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "KERAS_HOME": str(tmp_path / "keras")})
    assert result.returncode == 0, result.stderr
    assert "dashboard: http://127.0.0.1:" in result.stderr

    uploads, catalogue = open_store(store, "uploads"), open_store(store, "catalogue")
    assert uploads.meta["status_counts"] == {"http_404": 1, "ok": 1}
    assert catalogue.meta["status_counts"] == {"ok": 3}
    matches = pd.read_csv(tmp_path / "matches.csv")
    assert matches["uploads_id"].tolist() == ["x"]
    assert matches["catalogue_id"].iloc[0] in {"a", "b", "c"}


def test_clients_without_the_cluster_certificate_are_refused(tls_cluster, certs):
    address = tls_cluster.address
    with pytest.raises(ImgsimError, match="uses TLS: pass --tls-ca-file"):
        with connect(options=ClusterOptions(scheduler=address)):
            pass
    with pytest.raises(ImgsimError, match="is not tls://"):
        with connect(options=client_options(certs, None,
                                            scheduler=address.replace("tls://", "tcp://"))):
            pass
    impostor = Security(tls_ca_file=str(certs["ca"]), tls_client_cert=str(certs["impostor"]),
                        tls_client_key=str(certs["impostor-key"]), require_encryption=True)
    stranger = Security(tls_ca_file=str(certs["other-ca"]),
                        tls_client_cert=str(certs["impostor"]),
                        tls_client_key=str(certs["impostor-key"]), require_encryption=True)
    # Under TLS 1.3 the scheduler rejects a client certificate after the client's side of the
    # handshake: the refusal surfaces as an SSL alert or as a dropped connection.
    with pytest.raises(Exception):
        Client(address, security=impostor, timeout="2s").close()
    with pytest.raises(OSError, match="certificate does not match"):
        Client(address, security=stranger, timeout="2s").close()
    with pytest.raises(OSError, match="Connection reset"):
        Client(address.replace("tls://", "tcp://"), timeout="2s").close()

    with connect(options=client_options(certs, tls_cluster.scheduler_file)) as client:
        clients = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients))
        assert [c for c in clients if c != "fire-and-forget"] == [client.id]


def test_preflight_names_what_the_cluster_lacks(tmp_path, certs, image_dir):
    """No workers at all: one error within seconds, naming the GPU and the fetch workers."""
    cluster = ProcessCluster(tmp_path, certs)
    try:
        cluster.start_scheduler()
        csv = tmp_path / "in.csv"
        csv.write_text(f"url\n{image_dir / 'chelsea.jpg'}\n")
        started = time.monotonic()
        with pytest.raises(ImgsimError, match="no workers: none has the GPU resource .* none "
                                              "can fetch images; start one with: dask worker "
                                              "tls://127.0.0.1"):
            extract(str(csv), "x", str(tmp_path / "store"), weights="random",
                    cluster_options=client_options(certs, cluster.scheduler_file,
                                                   wait_workers=1))
        assert time.monotonic() - started < 10
    finally:
        cluster.stop()


class _Workers:
    """Stands in for a client in the version check: `run` answers per worker."""

    def __init__(self, answers):
        self.answers = answers

    def run(self, function, *args, on_error):
        return self.answers


def test_version_check_names_the_odd_workers():
    from importlib.metadata import PackageNotFoundError, version

    mine = version("imgsim-dask")
    _check_versions(_Workers({"tls://a:1": mine, "tls://b:1": mine}))
    with pytest.raises(ImgsimError, match=r"tls://b:1 \(0\.0\.1\) run another imgsim-dask"):
        _check_versions(_Workers({"tls://a:1": mine, "tls://b:1": "0.0.1"}))
    with pytest.raises(ImgsimError, match="not installed on worker.* tls://c:1"):
        _check_versions(_Workers({"tls://c:1": PackageNotFoundError("imgsim-dask")}))
