"""Would an INT8 model keep the features? NNCF post-training quantisation against float32.

    python scripts/bench_int8.py [--model efficientnet-lite0] [--descriptor avg] [--seconds 5]

Exports the model as imgsim's OpenVINO runtime does (`runtime.export_ir`), quantises it
with NNCF (`nncf.quantize`, 100 calibration crops of the photographs that install with
scikit-image), in several variants, and compares each with float32 on those photographs:
the worst and median per-image cosine and the largest change of any pairwise similarity
(the issue's bar: 0.01). Then both compiled models' throughput, one after the other in
rounds, at batch 32 with the latency hint. Needs `pip install nncf`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def calibration_crops(count: int, size: int, seed: int = 123) -> list[np.ndarray]:
    from imgsim_dask.calibrate.benchmark import originals

    rng = np.random.default_rng(seed)
    photos = [photo for _, photo in originals()]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.4, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        crop = photo.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
        crops.append(np.asarray(crop, np.uint8)[None])
    return crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--descriptor", default="avg", help="avg: rmac's pooling fails to compile")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed per model and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import nncf
    import openvino as ov

    from imgsim_dask.calibrate.benchmark import originals
    from imgsim_dask.descriptor import DESCRIPTORS
    from imgsim_dask.models import build_model, get_spec, resolve_weights
    from imgsim_dask.runtime import export_ir

    size = get_spec(args.model).image_size
    pooling = DESCRIPTORS[args.descriptor].pooling
    model = build_model(resolve_weights(args.model, None), tempfile.gettempdir(), pooling)
    ir = os.path.join(tempfile.mkdtemp(prefix="imgsim-int8-"), "model.xml")
    export_ir(model, ir)
    core = ov.Core()
    fp32 = core.read_model(ir)
    photos = np.stack([np.asarray(p.resize((size, size))) for _, p in originals()])
    crops = nncf.Dataset(calibration_crops(100, size))

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def compiled(ov_model):
        return core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})

    reference = unit(compiled(fp32).create_infer_request().infer(photos)[0])
    first_conv = [op.get_friendly_name() for op in fp32.get_ordered_ops()
                  if op.get_type_name() == "Convolution"][:1]  # fmt: skip
    variants = {
        "performance preset": {},
        "mixed preset": {"preset": nncf.QuantizationPreset.MIXED},
        "stem convolution kept in float32": {"ignored_scope": nncf.IgnoredScope(first_conv)},
    }
    quantised = {}
    for name, kw in variants.items():
        started = time.perf_counter()
        quantised[name] = nncf.quantize(fp32.clone(), crops, subset_size=100, **kw)
        out = unit(compiled(quantised[name]).create_infer_request().infer(photos)[0])
        cosine = np.einsum("ij,ij->i", reference, out)
        change = np.abs(reference @ reference.T - out @ out.T).max()
        print(f"{name}: quantised in {time.perf_counter() - started:.0f} s; cosine to float32 "
              f"min {cosine.min():.3f}, median {np.median(cosine):.3f}; largest similarity "
              f"change {change:.3f}", flush=True)  # fmt: skip

    batch = np.random.default_rng(0).integers(0, 256, (32, size, size, 3), np.uint8)
    runs = {"float32": compiled(fp32), "int8 (performance preset)": compiled(
        quantised["performance preset"])}  # fmt: skip
    for round_ in range(args.rounds):
        for name, model_run in runs.items():
            request = model_run.create_infer_request()
            request.infer(batch)
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < args.seconds:
                request.infer(batch)
                images += len(batch)
            rate = images / (time.perf_counter() - started)
            print(f"round {round_} {name}: {rate:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
