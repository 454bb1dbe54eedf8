"""Benchmark `imgsim review` on a large pairs table: whole-process seconds and page size.

Two sources of random vectors are imported (no thumbnails: the page gets placeholders), and
matched with `--top-k` into one pairs `.parquet` file of `--rows-a` x `--top-k` pairs; then
`imgsim review` runs `--repeats` times, each a fresh process, as a user runs it.

    .venv/bin/python scripts/bench_review.py              # 100,000 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def imgsim(*args: object) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "imgsim_dask", *map(str, args)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"imgsim {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-a", type=int, default=2000)
    parser.add_argument("--rows-b", type=int, default=3000)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results/review.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imgsim-bench-review-"))
    rng = np.random.default_rng(0)
    store = work / "store"
    for name, rows in (("left", args.rows_a), ("right", args.rows_b)):
        np.save(work / f"{name}.npy", rng.normal(size=(rows, args.dim)).astype(np.float32))
        imgsim("import", name, work / f"{name}.npy", "--store", store)
    pairs = work / "pairs.parquet"
    imgsim("match", "left", "right", "--store", store, "--top-k", args.top_k, "--out", pairs)
    seconds = []
    for i in range(args.repeats):
        page = work / f"review-{i}.html"
        started = time.perf_counter()
        done = imgsim("review", pairs, "--out", page)
        seconds.append(time.perf_counter() - started)
        print(done.stdout.strip(), f"({seconds[-1]:.2f} s)")
    report = {
        "pairs": args.rows_a * args.top_k,
        "seconds": seconds,
        "page_bytes": (work / "review-0.html").stat().st_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
