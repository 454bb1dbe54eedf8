"""Peak RSS of the driver and the workers while extracting 10,000 and then 100,000 rows.

    python scripts/bench_memory.py --rows 10000 100000 --out bench-results/memory.json

Rows are local paths: one in `--ok-every` points at a small real JPEG (it goes through
decode and the model), the rest at files that do not exist (`not_found`), so the row
machinery (CSV blocks, partitions, row tables, Zarr chunks, Parquet parts) carries every
row while the model time stays affordable on 2 cores. Each size runs on a fresh local
cluster; peaks are above each process's RSS when the run starts (after warm-up).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
from bench_match import MiB, RssSampler, _worker_sampler_start, _worker_sampler_stop
from PIL import Image


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

    csv = write_csv(work, rows, ok_every)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--ok-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench-results/memory.json"))
    args = parser.parse_args()

    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="imgsim-mem-") as tmp:
            results.append(measure(rows, args.ok_every, Path(tmp)))
    first = results[0]
    print(
        f"{'rows':>8}{'ok rows':>9}{'seconds':>9}{'driver MiB (+run)':>19}"
        f"{'worker MiB (+run)':>19}{'driver x':>10}{'worker x':>10}"
    )
    for row in results:
        row["driver_peak_vs_first"] = row["driver_peak"] / first["driver_peak"]
        row["worker_peak_vs_first"] = row["worker_peak"] / first["worker_peak"]
        driver = f"{row['driver_peak'] / MiB:,.0f} (+{row['driver_peak_increase'] / MiB:,.0f})"
        worker = f"{row['worker_peak'] / MiB:,.0f} (+{row['worker_peak_increase'] / MiB:,.0f})"
        print(
            f"{row['rows']:>8}{row['ok_rows']:>9}{row['seconds']:>9.1f}{driver:>19}{worker:>19}"
            f"{row['driver_peak_vs_first']:>10.2f}{row['worker_peak_vs_first']:>10.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
