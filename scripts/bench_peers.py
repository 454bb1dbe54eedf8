"""imgsim against fastdup on one machine: whole-process seconds on the same local JPEGs.

    python scripts/bench_peers.py [--images 2100] [--rounds 2] [--accuracy]
        [--fastdup-python /path/to/venv/bin/python] [--imgsim-args "--model efficientnet-lite0"]...

Both tools read the same folder of JPEGs (the accuracy benchmark's set, `build_set`, with
six copies per edit: 2,117 images, the first `--images` kept), one after the other in each
round, the order alternating between rounds:

- **fastdup** (`pip install fastdup`, best in a virtualenv of its own: `--fastdup-python`):
  `fastdup.create(work_dir, input_dir).run(overwrite=True)`, which extracts its bundled
  model's features, builds its kNN graph and connected components. It runs with
  `SENTRY_OPT_OUT=1` inside `unshare -rn` (a network namespace with no interfaces), since it
  tries to send telemetry.
- **imgsim**: `imgsim extract` (a CSV of the files, the default model) then `imgsim dedupe`
  into a Parquet file, as two commands, on the embedded local cluster. Each
  `--imgsim-args` (repeatable) is a variant of its own, run in every round.

Each is timed as whole processes (interpreter start, imports, cluster start and all). With
`--accuracy`, both tools' features of the accuracy benchmark's set (seed 0) are scored as in
`scripts/bench_accuracy.py` (AP of the match and dedupe tasks). Results go to
`bench-results/peers.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import average_precision, pair_labels, require_whole_set

IMGSIM = str(Path(sys.executable).parent / "imgsim")
FASTDUP_FEATURE_DIM = 576  # its bundled model's feature length

# Run inside fastdup's interpreter: its whole job, then (with a third argument) its features
# and their files, for scoring.
FASTDUP_JOB = f"""
import json, sys, numpy as np, fastdup
work, images = sys.argv[1], sys.argv[2]
fastdup.create(work_dir=work, input_dir=images).run(overwrite=True)
if len(sys.argv) > 3:
    files, features = fastdup.load_binary_feature(work + "/atrain_features.dat", d={FASTDUP_FEATURE_DIM})
    np.save(sys.argv[3] + ".npy", np.asarray(features, np.float32))
    open(sys.argv[3] + ".json", "w").write(json.dumps([str(f) for f in files]))
"""


def image_set(root: Path, count: int, seed: int = 0) -> pd.DataFrame:
    """The first `count` images of the accuracy set with six copies per edit (2,117)."""
    from imgsim_dask.calibrate.benchmark import build_set

    table = build_set(root, seed, per_edit=6, combos=4)
    if count > len(table):
        raise SystemExit(f"--images {count}: the set has {len(table)} images")
    for file in table["file"][count:]:
        os.remove(file)
    return table.iloc[:count].reset_index(drop=True)


def timed(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Whole-process seconds of `command`; its output goes to `log`; a failure stops."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}): see {log}")
    return seconds


def run_fastdup(python: str, images: Path, work: Path, features_to: Path | None = None) -> float:
    shutil.rmtree(work, ignore_errors=True)
    command = ["unshare", "-rn", python, "-c", FASTDUP_JOB, str(work), str(images)]
    if features_to is not None:
        command.append(str(features_to))
    env = {**os.environ, "SENTRY_OPT_OUT": "1"}
    return timed(command, work.parent / f"{work.name}.log", env)


def run_imgsim(table: pd.DataFrame, work: Path, extra: list[str]) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    csv, store = work / "files.csv", work / "store"
    table[["file"]].to_csv(csv, index=False)
    extract = [IMGSIM, "extract", str(csv), "--name", "peers", "--store", str(store),
               "--url-col", "file", *extra]  # fmt: skip
    dedupe = [
        IMGSIM,
        "dedupe",
        "peers",
        "--store",
        str(store),
        "--out",
        str(work / "pairs.parquet"),
    ]
    return {
        "extract": timed(extract, work / "extract.log"),
        "dedupe": timed(dedupe, work / "dedupe.log"),
    }


def scores(table: pd.DataFrame, features: np.ndarray) -> dict[str, float]:
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = features @ features.T
    out = {}
    for task in ("match", "dedupe"):
        ia, ib, truth = pair_labels(table, task)
        out[f"{task}_ap"] = round(average_precision(similarity[ia, ib], truth), 4)
    return out


def accuracy(python: str, work: Path, extra: list[str]) -> dict[str, dict[str, float]]:
    """Both tools' AP on the accuracy benchmark's set (seed 0, as bench_accuracy builds it)."""
    from imgsim_dask.calibrate.benchmark import build_set
    from imgsim_dask.store import open_source

    work.mkdir(parents=True, exist_ok=True)
    table = build_set(work / "accuracy-images", 0)
    run_fastdup(python, work / "accuracy-images", work / "accuracy-fastdup", work / "fd-features")
    files = json.loads((work / "fd-features.json").read_text())
    by_name = {Path(f).name: i for i, f in enumerate(files)}
    order = [by_name[Path(f).name] for f in table["file"]]  # fastdup's order is its own
    fastdup_features = np.load(work / "fd-features.npy")[order]
    run_imgsim(table, work / "accuracy-imgsim", extra)
    ours = open_source(str(work / "accuracy-imgsim" / "store"), "peers").features[:]
    return {"fastdup": scores(table, fastdup_features), "imgsim": scores(table, ours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fastdup-python", default=sys.executable,
                        help="an interpreter that imports fastdup (default: this one)")  # fmt: skip
    parser.add_argument(
        "--imgsim-args",
        action="append",
        help="options of imgsim extract, one variant each time given [default: --model "
        "efficientnet-lite0] (MobileNet's weights need a download)",
    )
    parser.add_argument("--accuracy", action="store_true", help="also score both tools' AP")
    parser.add_argument("--out", type=Path, default=Path("bench-results/peers.json"))
    args = parser.parse_args()
    require_whole_set()
    if shutil.which("unshare") is None:
        raise SystemExit("unshare (util-linux) is needed to run fastdup without a network")
    variants = {
        "imgsim" if len(args.imgsim_args or []) < 2 else f"imgsim {given}": shlex.split(given)
        for given in args.imgsim_args or ["--model efficientnet-lite0"]
    }

    work = Path(tempfile.mkdtemp(prefix="imgsim-peers-"))
    table = image_set(work / "images", args.images)
    print(f"{len(table)} JPEGs in {work / 'images'}")
    runs: list[dict] = []
    tools = ["fastdup", *variants]
    for round_ in range(args.rounds):  # each round starts with the next tool
        for tool in tools[round_ % len(tools) :] + tools[: round_ % len(tools)]:
            if tool == "fastdup":
                seconds = {"whole": run_fastdup(args.fastdup_python, work / "images", work / "fd")}
            else:
                seconds = run_imgsim(table, work / "imgsim", variants[tool])
                seconds["whole"] = seconds["extract"] + seconds["dedupe"]
            runs.append({"round": round_, "tool": tool, **seconds})
            print(f"round {round_} {tool}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
                  + f"  ({len(table) / seconds['whole']:.0f} images/s)", flush=True)  # fmt: skip
    best = {t: min(r["whole"] for r in runs if r["tool"] == t) for t in tools}
    for tool in variants:
        print(f"best whole-process: fastdup {best['fastdup']:.1f} s, {tool} {best[tool]:.1f} s; "
              f"its throughput is {best['fastdup'] / best[tool]:.2f}x fastdup's")  # fmt: skip
    result: dict = {"images": len(table), "runs": runs, "best": best}
    if args.accuracy:
        result["accuracy"] = {
            tool: accuracy(args.fastdup_python, work / f"accuracy-{i}", extra)
            for i, (tool, extra) in enumerate(variants.items())
        }
        print("AP on the accuracy set:", json.dumps(result["accuracy"]))
    save_result(args.out, result)


def save_result(path: Path, result: dict) -> None:
    """Write a benchmark's `result` as JSON, with the machine and the command line."""
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"machine": machine, "command": " ".join(sys.argv), **result}, indent=1)
    )
    print(f"written: {path}")


if __name__ == "__main__":
    main()
