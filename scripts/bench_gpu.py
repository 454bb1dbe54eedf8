"""The model stage and the score stage on an accelerator, against its matmul peak.

    KERAS_BACKEND=jax python scripts/bench_gpu.py --out bench-results/gpu.json
    KERAS_BACKEND=jax python scripts/bench_gpu.py --quick     # a small run, any device

One run measures, on the Keras backend's default device (a GPU where there is one):

- **model-only**: MobileNet v1 224 (`--weights random`: the same compute as ImageNet's) on
  pre-decoded uint8 batches held on the host, as the model worker runs it (Keras'
  `predict_on_batch`, the host-to-device copy included), at each `--batches` size in float32
  and under each of Keras' mixed precision policies in `--mixed`, with the worst per-image
  cosine between those features and float32's (random weights overflow float16: NaN);
- **matmul peak**: one square `--peak-size` matmul in full float32, in the backend's
  default precision (TF32 on NVIDIA GPUs) and in bfloat16: what the device can do;
- **score stage**: `match_features` in-process with `scorer="keras"` (B resident on the
  device, A streamed in blocks, the pairs at the threshold or each row's best back to the
  host) on random unit rows with planted near-duplicates, as TFLOP/s of its matmuls and as
  a fraction of the full-float32 peak (the precision it scores in); timed on a second run,
  after the first compiled the kernels for each block shape.

On a GPU machine without TensorFlow, carry keras, dask, distributed and their missing
dependencies as wheels (see docs/benchmarks.md, "GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from bench_match import make_data
from keras import ops

from imgsim_dask.match import match_features
from imgsim_dask.match.device import full_float32, keras_sees_gpu
from imgsim_dask.models import build_model, resolve_weights
from imgsim_dask.options import MatchOptions
from imgsim_dask.runtime import KerasPredictor


def sync(x) -> None:
    """Wait for the device to finish `x` (JAX and torch dispatch asynchronously)."""
    ops.convert_to_numpy(ops.sum(x))


def device_name() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return str([d.name for d in tf.config.list_physical_devices("GPU")] or "cpu")
    return backend


def model_only(batches: list[int], policies: list[str], seconds: float) -> list[dict]:
    """Images/s of the model on host uint8 batches, per policy and batch size."""
    weights = resolve_weights("mobilenet", "random")
    rng = np.random.default_rng(0)
    largest = rng.integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
    rows, reference = [], {}
    for policy in policies:
        keras.mixed_precision.set_global_policy(policy)
        with tempfile.TemporaryDirectory() as tmp:
            predictor = KerasPredictor(build_model(weights, tmp))
        for batch in batches:
            pixels = largest[:batch].astype(np.float32)
            features = predictor(pixels)  # compile for this shape
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                predictor(pixels)
                images += batch
            rate = images / (time.perf_counter() - started)
            with np.errstate(invalid="ignore"):  # float16 overflow: inf / inf
                unit = features / np.linalg.norm(features, axis=1, keepdims=True)
            reference.setdefault(batch, unit)
            cosine = float(np.einsum("ij,ij->i", unit, reference[batch]).min())
            rows.append(
                {
                    "policy": policy,
                    "batch": batch,
                    "images_per_second": rate,
                    "min_cosine_vs_float32": cosine,
                }
            )
            print(
                f"model-only {policy:<15} batch {batch:>5}: {rate:10.1f} images/s  "
                f"(min cosine vs float32 {cosine:.6f})",
                flush=True,
            )
    keras.mixed_precision.set_global_policy("float32")
    return rows


def matmul_peak(size: int, repeat: int) -> dict[str, float]:
    """TFLOP/s of a size^3 matmul: full float32, the backend's default precision, bfloat16."""
    rng = np.random.default_rng(1)
    host = rng.standard_normal((size, size), dtype=np.float32)
    rates = {}
    for name, dtype, exact in (
        ("float32", "float32", True),
        ("default", "float32", False),
        ("bfloat16", "bfloat16", False),
    ):
        x = ops.cast(ops.convert_to_tensor(host), dtype)

        def product(x=x):
            return ops.matmul(x, x)

        def timed():
            sync(product())  # warm-up, compile
            started = time.perf_counter()
            for _ in range(repeat):
                y = product()
            sync(y)
            return (time.perf_counter() - started) / repeat

        if exact:
            with full_float32():
                seconds = timed()
        else:
            seconds = timed()
        rates[name] = 2 * size**3 / seconds / 1e12
        print(f"matmul {size}^3 {name:<9}: {rates[name]:8.2f} TFLOP/s", flush=True)
    return rates


def score_stage(n: int, m: int, dim: int, options: dict, peak: float) -> list[dict]:
    """Seconds and TFLOP/s of match_features with the device kernel, threshold and top-1."""
    a, b, planted = make_data(n, m, dim, 500, 0)
    rows = []
    for mode in ({"threshold": 0.845}, {"top_k": 1}):
        match_options = MatchOptions(scorer="keras", **mode, **options)
        times = []
        for _ in range(2):  # the first run compiles the kernels for each block shape
            started = time.perf_counter()
            found = match_features(a, b, match_options)
            times.append(time.perf_counter() - started)
        seconds = times[-1]
        tflops = 2 * n * m * dim / seconds / 1e12
        pairs = set(zip(found.row_a.tolist(), found.row_b.tolist()))
        row = {
            "mode": mode,
            "seconds": seconds,
            "tflop_per_second": tflops,
            "fraction_of_float32_peak": tflops / peak,
            "pairs": len(found),
            "planted_found": len(planted & pairs),
        }
        rows.append(row)
        print(
            f"score {n} x {m} x {dim} {mode}: {seconds:.2f} s, {tflops:.2f} TFLOP/s "
            f"({100 * tflops / peak:.0f}% of the float32 peak), {len(found)} pairs, "
            f"{row['planted_found']}/{len(planted)} planted",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument(
        "--mixed",
        nargs="*",
        default=["mixed_bfloat16", "mixed_float16"],
        help="Keras mixed precision policies compared with float32",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed per configuration")
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--n", type=int, default=100_000, help="rows of A for the score stage")
    parser.add_argument("--m", type=int, default=100_000, help="rows of B for the score stage")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--block-rows", type=int, default=MatchOptions.block_rows)
    parser.add_argument("--slice-rows", type=int, default=MatchOptions.slice_rows)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: check the script on any machine in about a minute",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.seconds, args.peak_size = [8, 16], 1.0, 512
        args.n, args.m = 3000, 5000

    print(
        f"Keras {keras.__version__}, backend {keras.backend.backend()}, device "
        f"{device_name()} (GPU: {keras_sees_gpu()}), {platform.node()}",
        flush=True,
    )
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "gpu": keras_sees_gpu(),
        "model_only": model_only(args.batches, ["float32", *args.mixed], args.seconds),
    }
    report["matmul_peak_tflops"] = peak = matmul_peak(args.peak_size, repeat=10)
    report["score"] = score_stage(
        args.n,
        args.m,
        args.dim,
        {"block_rows": args.block_rows, "slice_rows": args.slice_rows},
        peak["float32"],
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
