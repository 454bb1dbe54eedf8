"""Quiet: keep TensorFlow's and absl's native start-up chatter off a user's terminal.

TensorFlow's C++ side writes INFO and WARNING lines when it loads ("oneDNN custom operations
are on", "Could not find cuda drivers", "failed call to cuInit" on a machine without a GPU)
that read like errors and are not. `TF_CPP_MIN_LOG_LEVEL` silences most of them, but not
absl's, so the model worker also holds its native stderr while it builds the model and
writes back every line that is not one of those (`filtered_native_stderr`). The CLI's `-v`
shows everything, on the driver and on the local cluster's workers (they inherit this
process' environment).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

SHOW_NATIVE_LOGS = "IMGSIM_NATIVE_LOGS"  # set to 1 (by -v): no filtering
NATIVE_LOG_LEVELS = {"TF_CPP_MIN_LOG_LEVEL": "2"}  # TensorFlow C++: INFO and WARNING off
# Lines that TensorFlow, XLA and absl print on every start without a GPU: never a problem.
NATIVE_CHATTER = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cuda drivers|cuInit|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning"
    r"|oneDNN custom operations are on|This TensorFlow binary is optimized"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|computation placer already registered|Attempting to register factory for plugin"
)


def quiet_native_logs(show: bool | None = None) -> None:
    """Set this process' (and its children's) native log levels, or with `show` (default:
    `IMGSIM_NATIVE_LOGS=1` in the environment) leave every native line visible."""
    if show is None:
        show = os.environ.get(SHOW_NATIVE_LOGS) == "1"
    if show:
        os.environ[SHOW_NATIVE_LOGS] = "1"
        return
    for name, value in NATIVE_LOG_LEVELS.items():
        os.environ.setdefault(name, value)


@contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Hold file descriptor 2 in a temporary file while the block runs, then write back the
    lines that are not `NATIVE_CHATTER` (all of them under `IMGSIM_NATIVE_LOGS=1`)."""
    if os.environ.get(SHOW_NATIVE_LOGS) == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().splitlines(keepends=True)
                if not NATIVE_CHATTER.search(line.decode(errors="replace"))
            ]
            if kept:
                os.write(2, b"".join(kept))
