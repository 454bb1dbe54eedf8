"""Watching a job: the CLI prints the local cluster's dashboard link, the dashboard answers while
the job runs, and `--report` writes Dask's performance report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pandas as pd
import pytest


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


@pytest.mark.slow
@pytest.mark.cluster
def test_dashboard_answers_while_a_job_runs_and_report_is_written(tmp_path, http_server):
    urls = [f"{http_server}/{n}.jpg" for n in ("astronaut", "chelsea", "coffee")]
    urls += [f"{http_server}/slow/3"] * 2  # keeps the job running while the test looks
    pd.DataFrame({"url": urls}).to_csv(tmp_path / "in.csv", index=False)
    report = tmp_path / "report.html"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgsim_dask",
            "extract",
            tmp_path / "in.csv",
            "--name",
            "web",
            "--store",
            tmp_path / "store",
            "--workers",
            "1",
            "--weights",
            "random",
            "--partition-rows",
            "1",
            "--batch-size",
            "1",
            "--timeout",
            "10",
            "--no-progress",
            "--report",
            report,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KERAS_HOME": str(tmp_path / "keras")},
    )
    stderr: list[str] = []
    link_found = threading.Event()

    def read_stderr():
        for line in job.stderr:
            stderr.append(line)
            if line.startswith("dashboard: "):
                link_found.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert link_found.wait(180), "".join(stderr)
        link = next(line for line in stderr if line.startswith("dashboard: ")).split()[1]
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        base = link.removesuffix("/status")
        seen_while_running = []
        while job.poll() is None:
            try:
                status, _ = _get(link)
                _, counts = _get(f"{base}/json/counts.json")
            except OSError:  # the job has finished and is closing its cluster
                job.wait(60)
                break
            if job.poll() is None:
                seen_while_running.append((status, json.loads(counts)["tasks"]))
            time.sleep(0.2)
        assert any(status == 200 and tasks > 0 for status, tasks in seen_while_running), (
            seen_while_running
        )
        job.wait(300)
    finally:
        if job.poll() is None:
            job.kill()
    reader.join(10)
    job.stdout.close()
    job.stderr.close()
    assert job.returncode == 0, "".join(stderr)
    html = report.read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "embed" in html and "fetch" in html  # the task stream, under readable task names
    assert f"performance report: {report}" in "".join(stderr)
