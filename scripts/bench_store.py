"""Benchmark the store's place: extraction and matching into a local directory vs into an
S3-compatible server on 127.0.0.1 (moto's standalone server), side by side in one run.

    python scripts/bench_store.py --images 2000 --match-rows 20000 --repeats 3 \
        --out bench-results/store.json

The images are small JPEGs on local disk, the model MobileNet with random weights (the
same compute as ImageNet weights), so the figures show what the store costs, not the
network to the images. Matching is timed on `--match-rows` imported random 1024-d vectors
(a self-match at threshold 0.9, reading every chunk from the store). Runs alternate local, S3, local, S3, ... on one warm local
cluster, whose workers write the partitions; the ratio is S3 / local images per second.
moto is a Python server on the same 2 cores, so it costs more CPU than a real object
store would: the ratio is a lower bound for a real S3 endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def start_s3() -> object:
    """moto on a free loopback port, reached through the standard AWS_* variables (set
    before the cluster starts, so its workers inherit them)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    return server


def make_csv(root: Path, images: int) -> Path:
    """`images` distinct 160 x 120 JPEGs (noise over a gradient) and a CSV of their paths."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    paths = []
    ramp = np.linspace(0, 255, 160, dtype=np.float32)[None, :, None]
    for i in range(images):
        pixels = np.clip(ramp + rng.normal(0, 40, (120, 160, 3)), 0, 255).astype(np.uint8)
        path = root / "images" / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(str(path))
    csv = root / "images.csv"
    pd.DataFrame({"id": range(images), "url": paths}).to_csv(csv, index=False)
    return csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partition-rows", type=int, default=256)
    parser.add_argument("--match-rows", type=int, default=20000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    server = start_s3()
    from distributed import Client

    from imgsim_dask import extract, import_features, match_sources
    from imgsim_dask.cluster import local_cluster

    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    csv = make_csv(root, args.images)
    stores = {"local": str(root / "store"), "s3": "s3://bench/store"}
    runs: dict[str, dict[str, list[float]]] = {
        place: {"extract": [], "match": []} for place in stores
    }
    options = dict(weights="random", partition_rows=args.partition_rows, progress=False)
    vectors = root / "vectors.npy"
    np.save(vectors, np.random.default_rng(1).normal(size=(args.match_rows, 1024)).astype("f4"))
    for store in stores.values():
        import_features("vectors", vectors, store, threshold=0.9, partition_rows=4096)
    with local_cluster(dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.wait_for_workers(len(cluster.worker_spec), timeout=120)
        extract(str(csv), "warm", str(root / "warm"), cluster=client, **options)  # compile
        for repeat in range(args.repeats):
            for place, store in stores.items():
                started = time.perf_counter()
                extract(str(csv), "bench", store, cluster=client, overwrite=True, **options)
                runs[place]["extract"].append(args.images / (time.perf_counter() - started))
                started = time.perf_counter()
                match_sources("vectors", "vectors", store, cluster=client)
                runs[place]["match"].append(time.perf_counter() - started)
                print(
                    f"repeat {repeat + 1} {place:5}: extract "
                    f"{runs[place]['extract'][-1]:7.1f} images/s, match "
                    f"{runs[place]['match'][-1]:5.2f} s",
                    flush=True,
                )
    server.stop()
    median = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in runs.items()}
    result = {
        "images": args.images,
        "partition_rows": args.partition_rows,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": sys.version.split()[0],
        "runs": runs,
        "median": median,
        "extract_ratio_s3_over_local": round(
            median["s3"]["extract"] / median["local"]["extract"], 3
        ),
        "match_time_ratio_s3_over_local": round(
            median["s3"]["match"] / median["local"]["match"], 3
        ),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
