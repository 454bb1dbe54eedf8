"""Ctrl-C during the first CSV scan: one line, no distributed tracebacks."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from support.cli import default_sigint

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_ctrl_c_during_the_csv_scan_is_one_line(tmp_path):
    line = "".join(
        f'{i},"a title, with commas {i}",http://127.0.0.1:9/{i}.jpg\n' for i in range(100_000)
    )
    with open(tmp_path / "big.csv", "w") as f:  # ~127 MB: eight 16 MiB blocks to scan
        f.write("id,title,url\n" + line * 20)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgsim_dask",
            "extract",
            "big.csv",
            "--name",
            "big",
            "--weights",
            "random",
            "--workers",
            "1",
            "--no-progress",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    seen = ""
    while "dashboard:" not in seen:  # the cluster is up: the scan starts now
        seen = process.stderr.readline()
        assert seen, "imgsim ended before its cluster started"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().endswith("imgsim: interrupted"), err
    assert "Task exception was never retrieved" not in err and "Traceback" not in err, err


def test_ctrl_c_while_a_small_job_waits_on_a_download_ends_at_once(tmp_path, fault_server):
    """A small job's workers are threads of the CLI's process (no worker processes to kill):
    Ctrl-C while downloads hang still ends it in one line, without waiting out their timeout."""
    urls = [f"{fault_server.base_url}/slow/60?n={i}" for i in range(3)]
    (tmp_path / "in.csv").write_text("url\n" + "\n".join(urls) + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "imgsim_dask", "-v", "extract", "in.csv", "--name", "web"]
        + ["--weights", "random", "--timeout", "90", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    seen = ""
    while "a small job" not in seen:  # its cluster is up in this process: the job starts
        seen = process.stderr.readline()
        assert seen, "imgsim ended before its cluster started"
    deadline = time.monotonic() + 60
    while not any(path.startswith("/slow/60") for path in fault_server.hits):
        assert time.monotonic() < deadline and process.poll() is None, "no download started"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)  # well short of the downloads' 60 s
    assert process.returncode == 130, err
    assert err.strip().endswith("imgsim: interrupted"), err
    assert "Traceback" not in err, err
