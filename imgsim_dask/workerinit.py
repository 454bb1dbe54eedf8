"""Preload of the local cluster's worker processes: Ctrl-C is the driver's to handle, and
the cluster's own shutdown is not reported as an error.

A terminal's Ctrl-C reaches the whole process group, the worker processes included; the
driver cancels the work and closes the cluster, so a worker that took it too only died first,
with a KeyboardInterrupt traceback of its own (and its nanny's errors).

When the driver closes the local cluster, distributed can log two races as errors with
30-line tracebacks: a worker's heartbeat in flight as the scheduler goes, and a worker
sending a result to a peer that is closing (`get_data`). The local scheduler and its workers
only ever go because the driver is closing them (or has died, and the nannies end the
workers then), and a transfer that fails is the receiving side's to retry, so those two
records are dropped here, and only on local workers (`CLOSING_NOISE`).
"""

import logging
import signal
import threading

HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat"
PEER_GONE = "failed during get data with"


class _DropClosingNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith((HEARTBEAT_LOST, PEER_GONE))


CLOSING_NOISE = _DropClosingNoise()  # on `distributed.worker` of local workers' processes


def dask_setup(worker) -> None:
    logging.getLogger("distributed.worker").addFilter(CLOSING_NOISE)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
