"""Benchmark extraction: model-only vs imgsim end-to-end vs the original's algorithm, one run.

    python scripts/bench_extract.py --images 1000 --latency-ms 0 200 --out bench-results/extract.json

Images are JPEGs of realistic sizes (500-1500 px) cut from scikit-image's photographs,
served by an HTTP server on 127.0.0.1 that waits `latency` before every response.
Reported, on the same images and the same model (MobileNet, random weights: the same
compute as ImageNet weights):

- model-only: the model on pre-decoded uint8 batches, in this process, under imgsim's
  runtime (`--runtime`, default auto: OpenVINO on a CPU) and under Keras (TensorFlow);
- imgsim: `imgsim_dask.extract` on the embedded local cluster (warm), per latency and
  with local file paths;
- original: the original's `save_data` loop — per batch a fresh process pool of 4 that
  downloads and decodes, then the model predicts; the stages never overlap.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SOURCES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "brick.png",
    "grass.png",
    "ihc.png",
)


def make_images(root: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs, 500-1500 px on the long side, random crops of real photographs."""
    from imgsim_dask.demo import sample_path

    root = root.resolve()  # relative paths in a CSV are read relative to the CSV's folder
    root.mkdir(parents=True, exist_ok=True)
    existing = sorted(root.glob("*.jpg"))
    if len(existing) == count:
        return existing
    rng = np.random.default_rng(seed)
    photos = [Image.open(sample_path(name)).convert("RGB") for name in SOURCES]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(500, 1501))
        scale = long_side / max(cw, ch)
        image = photo.crop((x, y, x + cw, y + ch)).resize((int(cw * scale), int(ch * scale)))
        path = root / f"img{i:05d}.jpg"
        image.save(path, quality=int(rng.integers(75, 95)))
        paths.append(path)
    return paths


class LatencyServer(ThreadingHTTPServer):
    """Serves a directory from 127.0.0.1, sleeping `latency` seconds before each response."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, root: Path):
        self.latency = 0.0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                time.sleep(server.latency)
                super().do_GET()

        super().__init__(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def decode_original(url: str) -> np.ndarray | None:
    """The original's per-image work: download, decode, resize to 224 (no draft)."""
    try:
        data = requests.get(url, timeout=30).content
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224))
        return np.asarray(image, dtype=np.uint8)
    except Exception:
        return None


def run_original(model, urls: list[str], batch_size: int) -> float:
    """The original's save_data: per batch a fresh pool of 4 fetches, then predict. Seconds."""
    started = time.perf_counter()
    ctx = multiprocessing.get_context("fork")
    for start in range(0, len(urls), batch_size):
        with ctx.Pool(4) as pool:
            decoded = [
                x
                for x in pool.map(decode_original, urls[start : start + batch_size])
                if x is not None
            ]
        model.predict_on_batch(np.stack(decoded).astype(np.float32))
    return time.perf_counter() - started


def run_model_only(predictor, pixels: np.ndarray, batch_size: int) -> float:
    from imgsim_dask.embed import embed_pixels

    embed_pixels(predictor, pixels[:batch_size], batch_size)  # warm-up
    started = time.perf_counter()
    embed_pixels(predictor, pixels, batch_size)
    return time.perf_counter() - started


def run_imgsim(client, csv: Path, store: Path, name: str, options: dict) -> float:
    from imgsim_dask import extract

    started = time.perf_counter()
    source = extract(
        str(csv), name, str(store), cluster=client, weights="random", overwrite=True, **options
    )
    seconds = time.perf_counter() - started
    assert source.status_counts() == {"ok": source.meta.rows}, source.status_counts()
    return seconds


def side_by_side(
    args, options: dict, paths: list[Path], work: Path, variants: dict[str, tuple[dict, dict]]
) -> dict:
    """Variants of the extraction side by side: each one's decode CPU per image, and whole
    extractions interleaved (a, b, a, b, ...). `variants`: name -> (decode_image keyword
    arguments, extract options)."""
    from distributed import Client

    from imgsim_dask.cluster import local_cluster
    from imgsim_dask.decode import decode_image

    blobs = [p.read_bytes() for p in paths]
    decode: dict[str, float] = {}
    for _ in range(3):
        for name, (decode_args, _) in variants.items():
            started = time.process_time()
            for blob in blobs:
                decode_image(blob, 224, **decode_args)
            ms = (time.process_time() - started) * 1000 / len(blobs)
            decode[name] = min(decode.get(name, ms), ms)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    csv = write_csv(work / "local.csv", [str(p) for p in paths])
    with (
        local_cluster(fetch_workers=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        for round_ in range(args.rounds):  # alternate the order: a, b, then b, a, ...
            for name, (_, extract_options) in list(variants.items())[:: 1 - 2 * (round_ % 2)]:
                seconds[name].append(
                    run_imgsim(client, csv, work / "store", name, {**options, **extract_options})
                )
    first, second = variants
    return {
        "images": len(paths),
        "decode_ms_per_image": decode,
        "extract_seconds": seconds,
        f"{first}_slower": min(seconds[first]) / min(seconds[second]) - 1,
    }


def thumbnails_ab(args, options: dict, paths: list[Path], work: Path) -> None:
    """Thumbnails on and off, and the thumbnails' bytes per row."""
    from dataclasses import replace

    from imgsim_dask import open_source

    report = side_by_side(args, options, paths, work, {
        "thumbnails": ({"thumbnail": True}, {"fetch": replace(options["fetch"], thumbnails=True)}),
        "none": ({"thumbnail": False}, {"fetch": replace(options["fetch"], thumbnails=False)}),
    })  # fmt: skip
    source = open_source(str(work / "store"), "thumbnails")
    sizes = [len(t) for t in source.thumbnails(source.rows(["row"])["row"].to_numpy()) if t]
    report["thumbnail_bytes_per_row"] = sum(sizes) / len(sizes)
    write_report(args, "extract-thumbnails.json", report)


def descriptor_ab(args, options: dict, paths: list[Path], work: Path) -> None:
    """efficientnet-lite0's default descriptor (rmac-trim) against plain average pooling."""
    model = {"model": "efficientnet-lite0"}
    report = side_by_side(args, options, paths, work, {
        "rmac-trim": ({"trim_borders": True}, {**model, "descriptor": "rmac-trim"}),
        "avg": ({"trim_borders": False}, {**model, "descriptor": "avg"}),
    })  # fmt: skip
    write_report(args, "extract-descriptor.json", report)


def write_report(args, name: str, report: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def write_csv(path: Path, urls: list[str]) -> Path:
    pd.DataFrame({"id": range(len(urls)), "url": urls}).to_csv(path, index=False)
    return path


def main() -> None:
    from imgsim_dask import ExtractOptions, FetchOptions
    from imgsim_dask.options import RUNTIMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 200.0])
    parser.add_argument("--cache", type=Path, default=Path("bench-results/images"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/extract.json"))
    parser.add_argument("--skip-original", action="store_true")
    parser.add_argument(
        "--ab",
        choices=("thumbnails", "descriptor"),
        help="only compare two variants side by side: thumbnails on and off, or "
        "efficientnet-lite0's rmac-trim descriptor and average pooling (local files, "
        "--rounds interleaved rounds, and decode time per image)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --ab")
    parser.add_argument("--partition-rows", type=int, default=ExtractOptions.partition_rows)
    parser.add_argument("--fetch-threads", type=int, default=FetchOptions.threads)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=ExtractOptions.batch_size,
        help="model batch for model-only and imgsim",
    )
    parser.add_argument(
        "--runtime", default=ExtractOptions.runtime, choices=RUNTIMES, help="imgsim's model runtime"
    )
    parser.add_argument(
        "--original-batch-size",
        type=int,
        default=16,
        help="the original's batch (its README's demo sets 16)",
    )
    args = parser.parse_args()

    from distributed import Client

    from imgsim_dask.cluster import local_cluster
    from imgsim_dask.fetch import fetch_partition
    from imgsim_dask.models import build_model, resolve_weights
    from imgsim_dask.runtime import KerasPredictor, make_predictor

    options = {
        "partition_rows": args.partition_rows,
        "batch_size": args.batch_size,
        "runtime": args.runtime,
        "fetch": FetchOptions(threads=args.fetch_threads),
    }
    paths = make_images(args.cache / str(args.images), args.images)
    server = LatencyServer(paths[0].parent)
    work = Path(tempfile.mkdtemp(prefix="imgsim-bench-"))
    model = build_model(resolve_weights("mobilenet", "random"), str(work))
    pixels = fetch_partition(
        pd.DataFrame({"url": [str(p) for p in paths]}), "url", FetchOptions()
    ).pixels
    predictors = [make_predictor(model, args.runtime)]
    if predictors[0].name != "keras":
        predictors.append(KerasPredictor(model))
    results = [
        {
            "config": f"model-only, {predictor.name} (pre-decoded)",
            "latency_ms": None,
            "seconds": run_model_only(predictor, pixels, args.batch_size),
        }
        for predictor in predictors
    ]

    if args.ab:
        {"thumbnails": thumbnails_ab, "descriptor": descriptor_ab}[args.ab](
            args, options, paths, work
        )
        return
    with (
        local_cluster(fetch_workers=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        run_imgsim(
            client,
            write_csv(work / "warm.csv", [str(p) for p in paths[: args.batch_size]]),
            work / "store",
            "warm",
            options,
        )
        local_csv = write_csv(work / "local.csv", [str(p) for p in paths])
        results.append(
            {
                "config": "imgsim, local files",
                "latency_ms": None,
                "seconds": run_imgsim(client, local_csv, work / "store", "local", options),
            }
        )
        for latency in args.latency_ms:
            server.latency = latency / 1000
            csv = write_csv(
                work / f"http{int(latency)}.csv", [f"{server.url}/{p.name}" for p in paths]
            )
            results.append(
                {
                    "config": f"imgsim, HTTP +{latency:g} ms",
                    "latency_ms": latency,
                    "seconds": run_imgsim(
                        client, csv, work / "store", f"http{int(latency)}", options
                    ),
                }
            )
    if not args.skip_original:
        for latency in args.latency_ms:
            server.latency = latency / 1000
            urls = [f"{server.url}/{p.name}" for p in paths]
            results.append(
                {
                    "config": f"original, HTTP +{latency:g} ms",
                    "latency_ms": latency,
                    "seconds": run_original(model, urls, args.original_batch_size),
                }
            )

    model_only = len(paths) / results[0]["seconds"]
    for row in results:
        row["images_per_s"] = round(len(paths) / row["seconds"], 2)
        row["vs_model_only"] = round(row["images_per_s"] / model_only, 3)
        original = next(
            (
                r
                for r in results
                if r["config"].startswith("original") and r["latency_ms"] == row["latency_ms"]
            ),
            None,
        )
        if original and row["config"].startswith("imgsim"):
            row["vs_original"] = round(original["seconds"] / row["seconds"], 2)
    report = {
        "images": len(paths),
        "batch_size": args.batch_size,
        "runtime": predictors[0].name,
        "original_batch_size": args.original_batch_size,
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(pd.DataFrame(results).to_string(index=False))
    plot(
        results,
        args.out.with_suffix(".png"),
        f"{report['machine']}; batch {args.batch_size}, original batch {args.original_batch_size}",
    )
    print(f"machine: {report['machine']}\nwritten: {args.out} and its .png plot")


def plot(results: list[dict], path: Path, machine_line: str) -> None:
    """A bar chart of images/s per configuration (needs matplotlib: pip install -e .[bench])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["config"] for row in results]
    rates = [row["images_per_s"] for row in results]
    colours = [
        "0.6" if label.startswith("model") else "C0" if label.startswith("imgsim") else "C3"
        for label in labels
    ]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    axes.barh(labels[::-1], rates[::-1], color=colours[::-1])
    for y, rate in enumerate(rates[::-1]):
        axes.text(rate, y, f" {rate:.1f}", va="center")
    axes.set_xlabel("images/s (MobileNet 224; batch sizes in the title)")
    axes.set_title(machine_line, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    main()
