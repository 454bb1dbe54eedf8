"""Ctrl-C during the first CSV scan: one line, no distributed tracebacks."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from support.cli import default_sigint

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def started(cwd, args: list[str], until: str) -> subprocess.Popen:
    """`imgsim ARGS` in `cwd`, Ctrl-C as a terminal delivers it, once its stderr has said
    `until` (its cluster is up)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "imgsim_dask", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    seen = ""
    while until not in seen:
        seen = process.stderr.readline()
        assert seen, "imgsim ended before its cluster started"
    return process


def assert_interrupted_in_one_line(process: subprocess.Popen, timeout: float) -> None:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 130, err
    assert err.strip().endswith("imgsim: interrupted"), err
    assert "Task exception was never retrieved" not in err and "Traceback" not in err, err


def test_ctrl_c_during_the_csv_scan_is_one_line(tmp_path):
    line = "".join(
        f'{i},"a title, with commas {i}",http://127.0.0.1:9/{i}.jpg\n' for i in range(100_000)
    )
    with open(tmp_path / "big.csv", "w") as f:  # ~127 MB: eight 16 MiB blocks to scan
        f.write("id,title,url\n" + line * 20)
    args = ["extract", "big.csv", "--name", "big", "--weights", "random", "--workers", "1"]
    process = started(tmp_path, [*args, "--no-progress"], "dashboard:")  # the scan starts now
    assert_interrupted_in_one_line(process, timeout=120)


def test_ctrl_c_while_a_small_job_waits_on_a_download_ends_at_once(tmp_path, fault_server):
    """A small job's workers are threads of the CLI's process (no worker processes to kill):
    Ctrl-C while downloads hang still ends it in one line, without waiting out their timeout."""
    urls = [f"{fault_server.base_url}/slow/60?n={i}" for i in range(3)]
    (tmp_path / "in.csv").write_text("url\n" + "\n".join(urls) + "\n")
    args = ["-v", "extract", "in.csv", "--name", "web", "--weights", "random", "--timeout", "90"]
    process = started(tmp_path, [*args, "--no-progress"], "a small job")  # (its cluster: here)
    deadline = time.monotonic() + 60
    while not any(path.startswith("/slow/60") for path in fault_server.hits):
        assert time.monotonic() < deadline and process.poll() is None, "no download started"
        time.sleep(0.1)
    assert_interrupted_in_one_line(process, timeout=30)  # well short of the downloads' 60 s
