"""Running the `imgsim` command as a user does: a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def imgsim(*args, cwd=None, env=None):
    """Run `python -m imgsim_dask ARGS` and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "imgsim_dask", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts: Ctrl-C as in a terminal. A child
    inherits an ignored SIGINT (a test run started in the background of a non-interactive
    shell has one), and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_usage_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imgsim: error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
