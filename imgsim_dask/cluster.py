"""Clusters: connect to an existing scheduler (over TLS if asked), or start the embedded local one.

No cluster manager of our own: an address, a scheduler file or `DASK_SCHEDULER_ADDRESS` for
anything remote, and for the embedded default a `SpecCluster` bound to 127.0.0.1 with one model
worker tagged `GPU` (one thread: the model owns its process) and fetch workers tagged `NET`.
`require_workers` is the pre-flight check every job runs before submitting anything.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster, Worker, performance_report
from distributed.security import Security

from .about import PACKAGE, VERSION
from .errors import ImgsimError
from .options import ClusterOptions, OptionError, opt
from .workerinit import CLOSING_NOISE

logger = logging.getLogger(__name__)

GPU = "GPU"
NET = "NET"
FETCH_THREADS_PER_WORKER = 2
CONNECT_TIMEOUT_S = 20.0


Cluster = Client | ClusterOptions | str | None  # where a job runs: see `connect`


def client_security(options: ClusterOptions) -> Security | None:
    """Dask `Security` for the client from the TLS files, or None (Dask's config applies)."""
    files = {
        "tls_ca_file": options.tls_ca_file,
        "tls_cert": options.tls_cert,
        "tls_key": options.tls_key,
    }
    if not any(files.values()):
        return None
    for name in ("tls_ca_file", "tls_cert"):
        if not files[name]:
            raise OptionError(
                f"TLS needs {opt('tls_ca_file')} and {opt('tls_cert')} (and "
                f"{opt('tls_key')} unless the key is in the certificate file); "
                f"{opt(name)} is missing"
            )
    for name, path in files.items():
        if path and not Path(path).is_file():
            raise OptionError(f"{opt(name)} {path}: no such file")
    return Security(
        tls_ca_file=options.tls_ca_file,
        tls_client_cert=options.tls_cert,
        tls_client_key=options.tls_key,
        require_encryption=True,
    )


def local_cluster(
    fetch_workers: int | None = None,
    dashboard_address: str = "127.0.0.1:8787",
    in_process: bool = False,
) -> SpecCluster:
    """A local cluster on 127.0.0.1: one `GPU` model worker plus `fetch_workers` `NET` workers.

    `in_process` runs the workers as threads of this process and the scheduler without its
    dashboard: a job of a few images is done before worker processes (about 3 s here) and
    the dashboard (1 s) would have started.
    """
    count = fetch_workers if fetch_workers is not None else max(1, (os.cpu_count() or 2) // 2)
    common: dict = {"host": "127.0.0.1", "dashboard": False}
    if not in_process:
        common["silence_logs"] = logging.ERROR
        common["preload"] = [
            *dask.config.get("distributed.worker.preload", []),
            "imgsim_dask.workerinit",
        ]  # the worker processes leave Ctrl-C to the driver
    kind = Worker if in_process else Nanny
    workers = {"model": {"cls": kind, "options": {**common, "nthreads": 1, "resources": {GPU: 1}}}}
    for i in range(count):
        workers[f"fetch-{i}"] = {
            "cls": kind,
            "options": {
                **common,
                "nthreads": FETCH_THREADS_PER_WORKER,
                "resources": {NET: FETCH_THREADS_PER_WORKER},
            },
        }
    dashboard = (
        {"dashboard": False, "dashboard_address": "127.0.0.1:0"}  # (its bare HTTP routes)
        if in_process
        else {"dashboard_address": dashboard_address}
    )
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", **dashboard}}
    with warnings.catch_warnings():  # a busy 8787 moves the dashboard; its link is logged
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        return SpecCluster(
            workers=workers, scheduler=scheduler, name="imgsim", silence_logs=logging.ERROR
        )


@contextmanager
def connect(cluster: Cluster = None, *, small: bool = False) -> Iterator[Client]:
    """A client for where a job runs, the one way the API says it:

    - a `distributed.Client`: used as it is (its owner reports);
    - a scheduler address (`tcp://HOST:8786`, `tls://...`): a client for it;
    - `ClusterOptions`: a scheduler address or file, TLS, the local cluster's size, and a
      performance report;
    - None: `DASK_SCHEDULER_ADDRESS` (Dask's config), else a new local cluster.

    A client this opens logs the dashboard link and, with `ClusterOptions.report`, writes
    Dask's performance report on exit. A `small` job on a plain local cluster (see
    `starts_a_plain_local_cluster`) runs on one in this process, with no dashboard.
    """
    if isinstance(cluster, Client):
        yield cluster
        return
    options = (
        ClusterOptions(scheduler=cluster)
        if isinstance(cluster, str)
        else cluster or ClusterOptions()
    )
    report = _report_path(options.report) if options.report else None
    with ExitStack() as stack:
        address = _remote_address(options)
        in_process = small and starts_a_plain_local_cluster(cluster)
        if address and options.workers:
            raise OptionError(
                f"{opt('workers')} sizes the local cluster, but the run goes to "
                f"the scheduler at {address}, whose workers are its own; drop "
                f"{opt('workers')}"
            )
        if address:
            active = stack.enter_context(_remote_client(address, options))
        else:
            if client_security(options):
                raise OptionError(
                    f"{opt('tls_ca_file')}/{opt('tls_cert')}/{opt('tls_key')} are "
                    f"for a remote scheduler: pass {opt('scheduler')} "
                    f"tls://HOST:PORT or {opt('scheduler_file')} too"
                )
            if in_process:  # its workers log to this process (see workerinit)
                workers_log = logging.getLogger("distributed.worker")
                workers_log.addFilter(CLOSING_NOISE)
                stack.callback(workers_log.removeFilter, CLOSING_NOISE)
            with _hold_sigint():  # Ctrl-C here would leave a half-started cluster behind
                local = stack.enter_context(
                    local_cluster(options.workers, options.dashboard_address, in_process)
                )
            active = stack.enter_context(Client(local))
            try:
                active.wait_for_workers(len(local.worker_spec), timeout="120s")
            except TimeoutError:
                raise ImgsimError(
                    "the local cluster's workers did not start within 120 s; "
                    "see the log above (-v for more)"
                ) from None
        if not in_process:
            logger.info("dashboard: %s", active.dashboard_link)
        else:
            logger.debug("a small job: its local cluster's workers run here, with no dashboard")
        if report:
            stack.enter_context(performance_report(filename=str(report)))
        try:
            yield active
        except BaseException:
            if in_process:  # a task may hang in a fetch until its timeout: leave its thread
                for worker in list(local.workers.values()):
                    local.sync(worker.close, executor_wait=False, reason="job ended")
            raise
        if options.keep_cluster and not address:
            _keep_up(active, options.keep_cluster)
    if report:
        logger.info("performance report: %s", report)


def _keep_up(client: Client, seconds: float) -> None:
    """Leave the finished job's cluster up for a look at its dashboard; Ctrl-C ends it."""
    logger.info(
        "dashboard stays up for %g s at %s (Ctrl-C ends it)", seconds, client.dashboard_link
    )
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        logger.info("closing the cluster")


@contextmanager
def _hold_sigint() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it; a second Ctrl-C raises at once.

    Dask gives no handle on a `SpecCluster` interrupted while it starts: its scheduler and
    worker processes went on starting, and its atexit hook failed to close them (an
    `AssertionError: Status.init` traceback after the "interrupted" line).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield  # not ours to change: a thread, an ignored SIGINT, a caller's own handler
        return
    held: list[int] = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _report_path(path: str) -> Path:
    report = Path(path)
    if not report.parent.is_dir():
        raise OptionError(f"{opt('report')} {path}: directory {report.parent} does not exist")
    return report


def starts_a_plain_local_cluster(cluster: Cluster) -> bool:
    """Whether `connect(cluster)` would start a local cluster that nothing in particular was
    asked of: no scheduler, and the local cluster's options all at their defaults (no
    worker count, dashboard address, report or keep-up time given)."""
    if isinstance(cluster, Client) or isinstance(cluster, str):
        return False
    options = cluster or ClusterOptions()
    return options == ClusterOptions() and _remote_address(options) is None


def _remote_address(options: ClusterOptions) -> str | None:
    """The scheduler's address from the options, the scheduler file, or Dask's config."""
    if options.scheduler:
        return options.scheduler
    if options.scheduler_file:
        try:
            return json.loads(Path(options.scheduler_file).read_text())["address"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OptionError(
                f"{opt('scheduler_file')} {options.scheduler_file}: no scheduler "
                f"address in it ({exc})"
            ) from None
    return dask.config.get("scheduler-address", None)


@contextmanager
def _remote_client(address: str, options: ClusterOptions) -> Iterator[Client]:
    security = client_security(options)
    if security is not None and "://" not in address:
        address = f"tls://{address}"
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if security is not None and scheme != "tls":
        raise ImgsimError(f"TLS files given, but the scheduler address {address} is not tls://")
    if (
        security is None
        and scheme == "tls"
        and not dask.config.get("distributed.comm.tls.client.cert", None)
    ):
        raise OptionError(
            f"the scheduler at {address} uses TLS: pass {opt('tls_ca_file')}, "
            f"{opt('tls_cert')} and {opt('tls_key')} (or set distributed.comm.tls "
            "in the Dask config)"
        )
    timeout = max(CONNECT_TIMEOUT_S, options.wait_workers)
    try:
        remote = Client(address, security=security, timeout=f"{timeout}s")
    except Exception as exc:  # refused, timed out, TLS handshake rejected: all one message
        reason = str(exc) or type(exc).__name__
        raise ImgsimError(f"cannot connect to the scheduler at {address}: {reason}") from None
    with remote:
        if options.wait_workers:
            _wait_for_gpu_worker(remote, options.wait_workers)
        yield remote


def _wait_for_gpu_worker(client: Client, timeout: float) -> None:
    """Wait up to `timeout` seconds for a `GPU` worker to join (workers may start after the job)."""
    deadline = time.monotonic() + timeout
    while not workers_with(client, GPU) and time.monotonic() < deadline:
        time.sleep(0.5)


def cluster_workers(client: Client) -> dict[str, dict]:
    """Every worker's scheduler record, by address, asked of the scheduler now.

    Not `client.scheduler_info()`: it returns a cache that the client's own periodic refresh
    overwrites with a worker-less summary, so it can read as no workers at all (74 of 2,000
    calls with a 5 ms refresh interval, distributed 2026.8).
    """
    assert client.scheduler is not None, "the client is not connected"
    with _hold_sigint():  # a Ctrl-C inside distributed's sync() logs tracebacks: raise it after
        return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def workers_with(client: Client, resource: str) -> list[str]:
    """Addresses of the workers that advertise `resource`."""
    workers = cluster_workers(client)
    return [addr for addr, info in workers.items() if info.get("resources", {}).get(resource)]


def require_workers(client: Client, *, fetch: bool, stage: str) -> list[str]:
    """Pre-flight: the `GPU` workers, or one error naming what the cluster lacks for `stage`.

    `fetch=True` (extraction) also needs a worker that can fetch images: `NET` workers when
    there are any, else any worker (a warning says the GPU workers will fetch too). Every
    worker must run this client's version of the package.
    """
    workers = cluster_workers(client)
    gpu = workers_with(client, GPU)
    assert client.scheduler is not None
    start = f"start one with: dask worker {client.scheduler.address} --nthreads 1 --resources GPU=1"
    if not workers and fetch:
        raise ImgsimError(
            f"the cluster has no workers: none has the GPU resource that the "
            f"{stage} tasks need and none can fetch images; {start}, and fetch "
            f"workers with --nthreads 8 --resources NET=8"
        )
    if not gpu:
        raise ImgsimError(f"no worker has the GPU resource, which the {stage} tasks need; {start}")
    if fetch and not workers_with(client, NET):
        logger.warning(
            "no worker has the NET resource: fetch tasks run on any worker, the GPU "
            "workers included"
        )
    _check_versions(client)
    return gpu


def _check_versions(client: Client) -> None:
    """Every worker must run the same version of the package as this client."""
    mine = VERSION
    found = client.run(version, PACKAGE, on_error="return")
    missing = sorted(addr for addr, v in found.items() if isinstance(v, PackageNotFoundError))
    if missing:
        raise ImgsimError(
            f"{PACKAGE} is not installed on worker(s) {', '.join(missing)}; "
            f"install {PACKAGE}=={mine} there"
        )
    other = sorted(f"{addr} ({v})" for addr, v in found.items() if v != mine)
    if other:
        raise ImgsimError(
            f"worker(s) {', '.join(other)} run another {PACKAGE} than this "
            f"client's {mine}; install the same version everywhere"
        )
