"""Running the `imgsim` command as a user does: a real subprocess."""

from __future__ import annotations

import os
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


def assert_usage_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imgsim: error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
