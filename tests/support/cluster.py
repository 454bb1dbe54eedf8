"""A cluster started the way users start one: `dask scheduler` + `dask worker` processes.

Everything listens on 127.0.0.1 and logs to one file (`cluster.log` in the cluster's folder).
With `tls=(ca file, certificate, key)` the scheduler speaks TLS and every process presents
that certificate. `popen` starts any other process (a deploy recipe that starts its own
scheduler) so that `stop` ends it with the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def tls_flags(ca_file, cert, key) -> list[str]:
    """The `--tls-*` options of `dask scheduler`, `dask worker` and `imgsim`."""
    return ["--tls-ca-file", str(ca_file), "--tls-cert", str(cert), "--tls-key", str(key)]


class ProcessCluster:
    """Scheduler and worker processes in `root`; their environment is `env` or, by default,
    this one with an empty Keras cache of their own (`root/worker-keras`)."""

    def __init__(self, root: Path, *, tls: tuple | None = None, env: dict | None = None):
        self.root = Path(root)
        self.tls = tls_flags(*tls) if tls else []
        self.env = (
            env
            if env is not None
            else {
                **os.environ,
                "KERAS_HOME": str(self.root / "worker-keras"),
                "TF_CPP_MIN_LOG_LEVEL": "2",
            }
        )
        self.scheduler_file = self.root / "scheduler.json"
        self.address: str | None = None
        self.processes: list[subprocess.Popen] = []
        self.log = open(self.root / "cluster.log", "w")

    def popen(self, args: list) -> subprocess.Popen:
        process = subprocess.Popen(args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def _dask(self, module: str, *args: str) -> subprocess.Popen:
        return self.popen([sys.executable, "-m", f"distributed.cli.{module}", *args, *self.tls])

    def wait_for_scheduler(self, timeout: float = 60) -> str:
        """The address in the scheduler file, once the scheduler has written it."""
        deadline = time.monotonic() + timeout
        while not self.scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        return self.address

    def start_scheduler(self) -> str:
        """Start `dask scheduler` (any free port); its address once it listens."""
        protocol = ["--protocol", "tls"] if self.tls else []
        self._dask(
            "dask_scheduler",
            *protocol,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(self.scheduler_file),
        )
        return self.wait_for_scheduler()

    def add_worker(self, *options: str) -> subprocess.Popen:
        """Start a `dask worker` for the scheduler, with `options` (--nthreads, --resources)."""
        return self._dask(
            "dask_worker",
            "--scheduler-file",
            str(self.scheduler_file),
            "--host",
            "127.0.0.1",
            "--no-dashboard",
            *options,
        )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM each process and wait for it, the last started first.

        Workers first, each to the end, then the scheduler: a worker told to stop while its
        scheduler is closing can hang in distributed's close (seen 1 run in 4 without this).
        A process still running after `timeout` is killed, and the stop fails.
        """
        hung = []
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                hung.append(process.args)
        self.log.close()
        if hung:
            raise RuntimeError(f"still running {timeout} s after SIGTERM, killed: {hung}")
