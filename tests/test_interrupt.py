"""Ctrl-C during the first CSV scan: one line, no distributed tracebacks."""

from __future__ import annotations

import signal
import subprocess
import sys

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
