"""Preload of the local cluster's worker processes: Ctrl-C is the driver's to handle.

A terminal's Ctrl-C reaches the whole process group, the worker processes included; the
driver cancels the work and closes the cluster, so a worker that took it too only died first,
with a KeyboardInterrupt traceback of its own (and its nanny's errors).
"""

import signal
import threading


def dask_setup(worker) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
