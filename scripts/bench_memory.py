"""Peak RSS of the driver and the workers while extracting 10,000 and then 100,000 rows,
or (`--match`) while matching imported sources of 100,000 to 2,000,000 rows.

    python scripts/bench_memory.py --rows 10000 100000 --out bench-results/memory.json
    python scripts/bench_memory.py --match --rows 100000 500000 2000000 \
        --out bench-results/memory-match.json

Rows are local paths: one in `--ok-every` points at a small real JPEG (it goes through
decode and the model), the rest at files that do not exist (`not_found`), so the row
machinery (CSV blocks, partitions, row tables, Zarr chunks, Parquet parts) carries every
row while the model time stays affordable on 2 cores. Each size runs on a fresh local
cluster, in a fresh process; peaks are above each process's RSS when the run starts
(after warm-up).

`--match`: A is `--rows` random unit vectors (`--dim`, imported), one row in 1,000 a noisy
copy of a row of B (`--b-rows`, the same for every size); `match_sources(A, B, out=DIR/)`
at threshold 0.8 on a cluster of two scoring workers, which write the pairs as a Parquet
dataset. The planted pairs are the only ones above the threshold, and each run checks that
it found exactly them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from bench_match import (
    MiB,
    RssSampler,
    _worker_sampler_start,
    _worker_sampler_stop,
    scoring_cluster,
)
from PIL import Image

from imgsim_dask.options import MatchOptions

PLANT_EVERY = 1000  # one row of A in this many copies a row of B
MATCH_THRESHOLD = 0.8  # random 128-d unit vectors stay below about 0.5; the copies are >= 0.9


def write_csv(root: Path, rows: int, ok_every: int) -> Path:
    from skimage import data

    image = root / "small.jpg"
    Image.fromarray(data.chelsea()).resize((64, 48)).save(image, quality=85)
    urls = [
        str(image) if i % ok_every == 0 else str(root / f"missing-{i}.jpg") for i in range(rows)
    ]
    path = root / f"rows-{rows}.csv"
    pd.DataFrame(
        {"id": range(rows), "title": [f"title {i}" for i in range(rows)], "url": urls}
    ).to_csv(path, index=False)
    return path


def measure(rows: int, ok_every: int, work: Path) -> dict:
    from distributed import Client

    from imgsim_dask import extract
    from imgsim_dask.cluster import local_cluster

    with ProcessPoolExecutor(1) as other:  # (so that this process's RSS holds none of it)
        csv = other.submit(write_csv, work, rows, ok_every).result()
    with (
        local_cluster(fetch_workers=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2, timeout=120)
        (work / "warm").mkdir()
        extract(
            str(write_csv(work / "warm", 64, ok_every)),
            "warm",
            str(work / "store"),
            cluster=client,
            weights="random",
            overwrite=True,
        )
        client.run(_worker_sampler_start)
        with RssSampler() as driver:
            source = extract(
                str(csv),
                f"rows{rows}",
                str(work / "store"),
                cluster=client,
                weights="random",
                overwrite=True,
            )
        workers = client.run(_worker_sampler_stop)
    assert sum(source.status_counts().values()) == rows
    return {
        "rows": rows,
        "ok_rows": source.status_counts().get("ok", 0),
        "seconds": source.meta.seconds,
        "driver_peak": driver.peak,
        "driver_peak_increase": driver.increase,
        "worker_peak": max(w["peak"] for w in workers.values()),
        "worker_peak_increase": max(w["peak"] - w["base"] for w in workers.values()),
    }


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_match_sources(work: Path, rows: int, b_rows: int, dim: int) -> set[tuple[int, int]]:
    """A (`rows`, written in pieces to a memory-mapped .npy) and B imported into
    `work/store`; the planted pairs (row of A, row of B)."""
    from imgsim_dask import import_features

    rng = np.random.default_rng(0)
    b = unit_rows(rng, b_rows, dim)
    np.save(work / "b.npy", b)
    a = np.lib.format.open_memmap(work / "a.npy", "w+", np.float32, (rows, dim))
    planted = set()
    for start in range(0, rows, 100_000):
        piece = unit_rows(rng, min(100_000, rows - start), dim)
        for i in range(0, len(piece), PLANT_EVERY):
            j = int(rng.integers(b_rows))
            copy = 0.95 * b[j] + 0.05 * unit_rows(rng, 1, dim)[0]
            piece[i] = copy / np.linalg.norm(copy)
            planted.add((start + i, j))
        a[start : start + len(piece)] = piece
    a.flush()
    del a
    for name in ("a", "b"):
        import_features(name, work / f"{name}.npy", work / "store", overwrite=True)
    return planted


def measure_match(rows: int, b_rows: int, dim: int, block_rows: int, work: Path) -> dict:
    from distributed import Client

    from imgsim_dask import match_sources

    with ProcessPoolExecutor(1) as other:  # (so that this process's RSS holds none of it)
        planted = other.submit(write_match_sources, work, rows, b_rows, dim).result()
    store = str(work / "store")
    with scoring_cluster(2, "4GiB") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        match_sources("b", "b", store, cluster=client, threshold=MATCH_THRESHOLD)  # warm-up
        client.run(_worker_sampler_start)
        with RssSampler() as driver:
            result = match_sources(
                "a", "b", store, cluster=client, threshold=MATCH_THRESHOLD,
                out=f"{work / 'pairs'}/", block_rows=block_rows,
            )  # fmt: skip
        workers = client.run(_worker_sampler_stop)
    pairs = pd.read_parquet(work / "pairs", columns=["row_a", "row_b"])
    found = set(zip(pairs["row_a"].tolist(), pairs["row_b"].tolist()))
    assert found == planted, (len(found), len(planted))
    return {
        "rows": rows,
        "b_rows": b_rows,
        "block_rows": block_rows,
        "pairs": len(found),
        "seconds": result.seconds,
        "driver_peak": driver.peak,
        "driver_peak_increase": driver.increase,
        "worker_peak": max(w["peak"] for w in workers.values()),
        "worker_peak_increase": max(w["peak"] - w["base"] for w in workers.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--ok-every", type=int, default=100)
    parser.add_argument("--match", action="store_true", help="match imported sources instead")
    parser.add_argument("--b-rows", type=int, default=5_000, help="--match: rows of B")
    parser.add_argument("--dim", type=int, default=128, help="--match: vector length")
    parser.add_argument(
        "--block-rows",
        type=int,
        default=MatchOptions().block_rows,
        help="--match: rows of A per task",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/memory.json"))
    args = parser.parse_args()

    results = []
    for rows in args.rows:
        # each size in a fresh process: what one run leaves allocated does not count in the next
        with (
            tempfile.TemporaryDirectory(prefix="imgsim-mem-") as tmp,
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh,
        ):
            if args.match:
                run = fresh.submit(
                    measure_match, rows, args.b_rows, args.dim, args.block_rows, Path(tmp)
                )
            else:
                run = fresh.submit(measure, rows, args.ok_every, Path(tmp))
            results.append(run.result())
    first = results[0]
    counted = "pairs" if args.match else "ok rows"
    print(
        f"{'rows':>8}{counted:>9}{'seconds':>9}{'driver MiB (+run)':>19}"
        f"{'worker MiB (+run)':>19}{'driver x':>10}{'worker x':>10}"
    )
    for row in results:
        row["driver_peak_vs_first"] = row["driver_peak"] / first["driver_peak"]
        row["worker_peak_vs_first"] = row["worker_peak"] / first["worker_peak"]
        driver = f"{row['driver_peak'] / MiB:,.0f} (+{row['driver_peak_increase'] / MiB:,.0f})"
        worker = f"{row['worker_peak'] / MiB:,.0f} (+{row['worker_peak_increase'] / MiB:,.0f})"
        print(
            f"{row['rows']:>8}{row.get('pairs', row.get('ok_rows')):>9}{row['seconds']:>9.1f}"
            f"{driver:>19}{worker:>19}"
            f"{row['driver_peak_vs_first']:>10.2f}{row['worker_peak_vs_first']:>10.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
