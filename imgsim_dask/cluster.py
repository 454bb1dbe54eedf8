"""Clusters: connect to an existing scheduler, or start the embedded local one.

No cluster manager of our own: an address (or `DASK_SCHEDULER_ADDRESS`) for anything
remote, and for the embedded default a `SpecCluster` bound to 127.0.0.1 with one model
worker tagged `GPU` (one thread: the model owns its process) and fetch workers tagged `NET`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster

from .errors import ImgsimError

logger = logging.getLogger(__name__)

GPU = "GPU"
NET = "NET"
FETCH_THREADS_PER_WORKER = 2


def local_cluster(fetch_workers: int | None = None,
                  dashboard_address: str = "127.0.0.1:8787") -> SpecCluster:
    """A local cluster on 127.0.0.1: one `GPU` model worker plus `fetch_workers` `NET` workers."""
    count = fetch_workers if fetch_workers is not None else max(1, (os.cpu_count() or 2) // 2)
    if count < 1:
        raise ImgsimError("--workers must be at least 1")
    common = {"host": "127.0.0.1", "dashboard": False, "silence_logs": logging.ERROR}
    workers = {"model": {"cls": Nanny, "options": {**common, "nthreads": 1,
                                                   "resources": {GPU: 1}}}}
    for i in range(count):
        workers[f"fetch-{i}"] = {"cls": Nanny, "options": {
            **common, "nthreads": FETCH_THREADS_PER_WORKER,
            "resources": {NET: FETCH_THREADS_PER_WORKER}}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1",
                                              "dashboard_address": dashboard_address}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="imgsim",
                       silence_logs=logging.ERROR)


@contextmanager
def connect(scheduler: str | None = None, client: Client | None = None,
            workers: int | None = None) -> Iterator[Client]:
    """A client: the one given, one for `scheduler` (or the configured address), or a local cluster."""
    if client is not None:
        yield client
        return
    address = scheduler or dask.config.get("scheduler-address", None)
    if address:
        try:
            remote = Client(address, timeout="20s")
        except OSError as exc:
            raise ImgsimError(f"cannot connect to the scheduler at {address}: {exc}") from None
        with remote:
            yield remote
        return
    with local_cluster(workers) as cluster, Client(cluster) as local:
        local.wait_for_workers(len(cluster.worker_spec), timeout="120s")
        yield local


def workers_with(client: Client, resource: str) -> list[str]:
    """Addresses of the workers that advertise `resource`."""
    workers = client.scheduler_info()["workers"]
    return [addr for addr, info in workers.items() if info.get("resources", {}).get(resource)]
