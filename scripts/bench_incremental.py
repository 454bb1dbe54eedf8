"""Benchmark `--new-only`: the cost of adding a few new rows to a large match.

Two sources of random unit vectors are imported (`imgsim import`), matched in full into a
Parquet dataset; then `--fraction` more rows are appended to each (`--append`) and matched
with `--new-only` into the same dataset, and, for the reference, the grown sources are
matched in full into another. All three runs share one warm local cluster (the default
embedded one: a GPU-tagged scoring worker), side by side in one process. The two
datasets must hold the same pairs.

    python scripts/bench_incremental.py                      # 100k x 100k x 256, +1%
    python scripts/bench_incremental.py --rows 100000 --dim 1024 --out inc.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from distributed import Client

from imgsim_dask import import_features, match_sources
from imgsim_dask.cluster import local_cluster
from imgsim_dask.match import available_cpus
from imgsim_dask.store import read_parquet


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each source before")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.01, help="rows appended to each")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    added = max(1, int(args.rows * args.fraction))
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        root = Path(tmp)
        store = root / "store"
        for name in ("a", "b"):
            x = unit_rows(rng, args.rows + added, args.dim)
            np.save(root / f"{name}0.npy", x[: args.rows])
            np.save(root / f"{name}1.npy", x[args.rows :])
            import_features(name, root / f"{name}0.npy", store, threshold=args.threshold)
        with (
            local_cluster(fetch_workers=1, dashboard_address="127.0.0.1:0") as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(2, timeout=120)
            times = {}

            def timed(label: str, **kw) -> None:
                started = time.perf_counter()
                result = match_sources("a", "b", store, cluster=client, **kw)
                times[label] = time.perf_counter() - started
                print(f"{label:<28}{times[label]:>9.2f} s  {result.summary()}", flush=True)

            timed("full match, before", out=f"{root}/pairs/")
            for name in ("a", "b"):
                import_features(name, root / f"{name}1.npy", store, append=True)
            timed("--new-only, after append", out=f"{root}/pairs/", new_only=True)
            timed("full match, after append", out=f"{root}/full/")
        added_up, full = (
            read_parquet(root / d, columns=["row_a", "row_b", "similarity"]).sort_values(
                ["row_a", "row_b"], ignore_index=True
            )
            for d in ("pairs", "full")
        )
    # the same pairs; similarities equal up to float32 rounding (the two runs' sgemms are
    # blocked differently)
    same = added_up[["row_a", "row_b"]].equals(full[["row_a", "row_b"]]) and bool(
        np.allclose(added_up["similarity"], full["similarity"], atol=1e-6)
    )
    ratio = times["--new-only, after append"] / times["full match, after append"]
    print(
        f"{args.rows:,} x {args.rows:,} x {args.dim} (+{added:,} rows each, "
        f"{100 * args.fraction:g}%): --new-only costs {100 * ratio:.1f}% of the full match; "
        f"same pairs as the full match: {'yes' if same else 'NO'}"
    )
    if args.out:
        report = {
            "args": vars(args),
            "seconds": times,
            "new_only_vs_full": ratio,
            "same_pairs": same,
            "machine": {
                "cpus": available_cpus(),
                "processor": platform.processor(),
                "ram_bytes": psutil.virtual_memory().total,
            },
        }
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
