"""Preload of the local cluster's worker processes: Ctrl-C is the driver's to handle, and
the cluster's own shutdown is not reported as an error.

A terminal's Ctrl-C reaches the whole process group, the worker processes included; the
driver cancels the work and closes the cluster, so a worker that took it too only died first,
with a KeyboardInterrupt traceback of its own (and its nanny's errors).

When the driver closes the local cluster, a worker's heartbeat can be in flight as the
scheduler goes, and distributed logs that as an error with a 30-line traceback. The local
scheduler is only ever gone because the driver is closing it (or has died, and the nannies
end the workers then), so those lines are dropped here, and only here.
"""

import logging
import signal
import threading

HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat"


class _DropLostHeartbeat(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HEARTBEAT_LOST)


def dask_setup(worker) -> None:
    logging.getLogger("distributed.worker").addFilter(_DropLostHeartbeat())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
