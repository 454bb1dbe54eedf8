"""Whole-process `imgsim extract` of small CSVs: a job's workers in this process against
worker processes, side by side.

    python scripts/bench_startup.py [--rows 1 64 256 1024] [--rounds 3]
        [--imgsim-args "--model efficientnet-lite0"]

A CSV of up to `IN_PROCESS_ROWS` (256) rows, read whole when it is inspected, runs on a local
cluster whose workers are threads of the command's process, with no dashboard. The other
variant asks for the same local cluster with `--workers N` (N the default fetch-worker
count), which starts worker processes and the dashboard as every job did before. Each
round runs every size in both variants, the order alternating; the first command warms
the model cache (`$KERAS_HOME/imgsim/openvino`) and is not counted. Results go to
`bench-results/startup.json`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_images
from bench_peers import IMGSIM, save_result, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--imgsim-args", default="--model efficientnet-lite0")
    parser.add_argument("--out", type=Path, default=Path("bench-results/startup.json"))
    args = parser.parse_args()
    extra = shlex.split(args.imgsim_args)
    work = Path(tempfile.mkdtemp(prefix="imgsim-startup-"))
    images = make_images(work / "images", max(args.rows))
    csvs = {}
    for rows in args.rows:
        csvs[rows] = work / f"rows{rows}.csv"
        csvs[rows].write_text("url\n" + "".join(f"{p}\n" for p in images[:rows]))
    processes = ["--workers", str(max(1, (os.cpu_count() or 2) // 2))]
    variants = {"in process": [], "worker processes": processes}

    def extract(rows: int, variant: str) -> float:
        command = [IMGSIM, "extract", str(csvs[rows]), "--name", "s", "--store",
                   str(work / "store"), "--overwrite", "--no-progress", *extra,
                   *variants[variant]]  # fmt: skip
        return timed(command, work / "extract.log")

    extract(min(args.rows), "in process")  # warms the model cache
    runs = []
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for rows in args.rows:
            for variant in order:
                seconds = extract(rows, variant)
                runs.append({"round": round_, "rows": rows, "variant": variant, "seconds": seconds})
                print(f"round {round_} {rows:5d} rows, {variant}: {seconds:.2f} s", flush=True)
    print("\nrows  " + "  ".join(f"{v:>22}" for v in variants) + "   ratio")
    table = []
    for rows in args.rows:
        best = {
            v: min(r["seconds"] for r in runs if r["rows"] == rows and r["variant"] == v)
            for v in variants
        }
        table.append({"rows": rows, **best})
        ratio = best["worker processes"] / best["in process"]
        print(
            f"{rows:5d} " + "  ".join(f"{best[v]:20.2f} s" for v in variants) + f"  {ratio:5.2f}x"
        )
    save_result(args.out, {"runs": runs, "best": table})


if __name__ == "__main__":
    main()
