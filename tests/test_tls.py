"""A TLS cluster started as users start one: `dask scheduler` + `dask worker` processes on 127.0.0.1.

Certificates are made here (support/certs.py): a cluster CA signs the scheduler/worker
certificate and the client's; a second CA signs an impostor's. The whole `imgsim run` goes
over TLS; clients without a certificate from the cluster CA are refused; the pre-flight check
names what a cluster lacks within seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client
from distributed.security import Security

from imgsim_dask import ClusterOptions, ImgsimError, extract, open_source
from imgsim_dask.cluster import _check_versions, connect

from support.certs import CertificateAuthority
from support.cluster import ProcessCluster, tls_flags


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """Paths: `ca`, `cluster`/`cluster-key`, `client`/`client-key`, and an impostor's pair."""
    root = tmp_path_factory.mktemp("tls")
    ca, other_ca = CertificateAuthority("cluster-ca"), CertificateAuthority("other-ca")
    files = {
        "ca": ca.write(root / "cluster-ca.pem"),
        "other-ca": other_ca.write(root / "other-ca.pem"),
    }
    for name, signer in (("cluster", ca), ("client", ca), ("impostor", other_ca)):
        issued = signer.issue(name, ip_addresses=["127.0.0.1"])
        files[name], files[f"{name}-key"] = issued.write(
            root / f"{name}.pem", root / f"{name}-key.pem"
        )
    return files


def _tls_args(certs, role: str) -> list[str]:
    return tls_flags(certs["ca"], certs[role], certs[f"{role}-key"])


def client_options(certs, scheduler_file: Path | None, **fields) -> ClusterOptions:
    return ClusterOptions(
        scheduler_file=str(scheduler_file) if scheduler_file else None,
        tls_ca_file=str(certs["ca"]),
        tls_cert=str(certs["client"]),
        tls_key=str(certs["client-key"]),
        **fields,
    )


def _cluster(root: Path, certs) -> ProcessCluster:
    """Scheduler and workers presenting the cluster certificate."""
    return ProcessCluster(root, tls=(certs["ca"], certs["cluster"], certs["cluster-key"]))


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    """A TLS scheduler, one model worker (GPU=1, one thread) and one fetch worker (NET=2)."""
    cluster = _cluster(tmp_path_factory.mktemp("tls-cluster"), certs)
    try:
        cluster.start_scheduler()
        cluster.add_worker("--nthreads", "1", "--resources", "GPU=1")
        cluster.add_worker("--nthreads", "2", "--resources", "NET=2")
        with connect(client_options(certs, cluster.scheduler_file)) as client:
            client.wait_for_workers(2, timeout=120)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.cluster
def test_whole_run_over_tls(tls_cluster, certs, http_server, tmp_path):
    """`imgsim run` with --scheduler-file and the client certificate: extract both, match."""
    pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "url": [f"{http_server}/{n}.jpg" for n in ("astronaut", "chelsea", "coffee")],
        }
    ).to_csv(tmp_path / "catalogue.csv", index=False)
    pd.DataFrame(
        {
            "id": ["x", "y"],
            "url": [f"{http_server}/chelsea_small.png", f"{http_server}/missing.jpg"],
        }
    ).to_csv(tmp_path / "uploads.csv", index=False)
    store = tmp_path / "store"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsim_dask",
            "run",
            tmp_path / "uploads.csv",
            tmp_path / "catalogue.csv",
            "--store",
            store,
            "--weights",
            "random",
            "--top-k",
            "1",
            "--partition-rows",
            "2",
            "--batch-size",
            "2",
            "--out",
            tmp_path / "matches.csv",
            "--no-progress",
            "--scheduler-file",
            tls_cluster.scheduler_file,
            *_tls_args(certs, "client"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_HOME": str(tmp_path / "keras")},
    )
    assert result.returncode == 0, result.stderr
    assert "dashboard: http://127.0.0.1:" in result.stderr

    uploads, catalogue = open_source(store, "uploads"), open_source(store, "catalogue")
    assert uploads.meta.status_counts == {"http_404": 1, "ok": 1}
    assert catalogue.meta.status_counts == {"ok": 3}
    matches = pd.read_csv(tmp_path / "matches.csv")
    assert matches["uploads_id"].tolist() == ["x"]
    assert matches["catalogue_id"].iloc[0] in {"a", "b", "c"}


@pytest.mark.cluster
def test_clients_without_the_cluster_certificate_are_refused(tls_cluster, certs):
    address = tls_cluster.address
    with pytest.raises(ImgsimError, match="uses TLS: pass tls_ca_file"):
        with connect(ClusterOptions(scheduler=address)):
            pass
    with pytest.raises(ImgsimError, match="is not tls://"):
        with connect(client_options(certs, None, scheduler=address.replace("tls://", "tcp://"))):
            pass
    impostor = Security(
        tls_ca_file=str(certs["ca"]),
        tls_client_cert=str(certs["impostor"]),
        tls_client_key=str(certs["impostor-key"]),
        require_encryption=True,
    )
    stranger = Security(
        tls_ca_file=str(certs["other-ca"]),
        tls_client_cert=str(certs["impostor"]),
        tls_client_key=str(certs["impostor-key"]),
        require_encryption=True,
    )
    # Under TLS 1.3 the scheduler rejects a client certificate after the client's side of the
    # handshake: the refusal surfaces as an SSL alert or as a dropped connection.
    with pytest.raises(Exception):  # noqa: B017  (an SSL error or a dropped connection)
        Client(address, security=impostor, timeout="2s").close()
    with pytest.raises(OSError, match="certificate does not match"):
        Client(address, security=stranger, timeout="2s").close()
    with pytest.raises(OSError, match="Connection reset"):
        Client(address.replace("tls://", "tcp://"), timeout="2s").close()

    with connect(client_options(certs, tls_cluster.scheduler_file)) as client:
        clients = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients))
        assert [c for c in clients if c != "fire-and-forget"] == [client.id]


@pytest.mark.cluster
def test_preflight_names_what_the_cluster_lacks(tmp_path, certs, image_dir):
    """No workers at all: one error within seconds, naming the GPU and the fetch workers."""
    cluster = _cluster(tmp_path, certs)
    try:
        cluster.start_scheduler()
        csv = tmp_path / "in.csv"
        csv.write_text(f"url\n{image_dir / 'chelsea.jpg'}\n")
        started = time.monotonic()
        with pytest.raises(
            ImgsimError,
            match="no workers: none has the GPU resource .* none "
            "can fetch images; start one with: dask worker "
            "tls://127.0.0.1",
        ):
            extract(
                str(csv),
                "x",
                str(tmp_path / "store"),
                weights="random",
                cluster=client_options(certs, cluster.scheduler_file, wait_workers=1),
            )
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
