"""What a smaller model input would save: efficientnet-lite0's model stage and JPEG decode
per image at several input sizes, side by side.

    python scripts/bench_input_size.py [--sizes 224 192 160] [--rounds 3] [--images 300]

The model (package weights, the default `rmac-trim` descriptor's pooling) runs under
OpenVINO, as on a CPU model worker, on batches of 32 uint8 images; each round times every
size once, in alternating order. Decoding is `decode_image` (Pillow's DCT-scaled draft, the
border trim, the resize) of the bench_peers JPEGs (the accuracy set, up to 660 px), on one
core. The match quality at each size comes from `scripts/bench_accuracy.py --image-size N`.
Results go to `bench-results/input-size.json`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import image_set, save_result

BATCH = 32


def predictor_at(size: int):
    from imgsim_dask.models import build_model, resolve_weights
    from imgsim_dask.models.efficientnet_lite import build_efficientnet_lite0
    from imgsim_dask.runtime import OpenVINOPredictor

    model = build_model(resolve_weights("efficientnet-lite0", None), tempfile.gettempdir(), "rmac")
    sized = build_efficientnet_lite0(pooling="rmac", image_size=size)
    sized.set_weights(model.get_weights())
    return OpenVINOPredictor.from_keras(sized)


def model_rate(predictor, size: int, batches: int) -> float:
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, size, size, 3), np.uint8)
    predictor(pixels)  # the first call compiles
    started = time.perf_counter()
    for _ in range(batches):
        predictor(pixels)
    return batches * BATCH / (time.perf_counter() - started)


def decode_ms(blobs: list[bytes], size: int) -> float:
    from imgsim_dask.decode import decode_image

    started = time.perf_counter()
    for blob in blobs:
        decode_image(blob, size, trim_borders=True)
    return 1000 * (time.perf_counter() - started) / len(blobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 192, 160])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="timed per size and round")
    parser.add_argument("--images", type=int, default=300, help="JPEGs decoded per round")
    parser.add_argument("--out", type=Path, default=Path("bench-results/input-size.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgsim-size-"))
    files = image_set(work / "images", args.images)["file"].tolist()
    blobs = [Path(f).read_bytes() for f in files]
    predictors = {size: predictor_at(size) for size in args.sizes}
    runs = []
    for round_ in range(args.rounds):
        order = args.sizes if round_ % 2 == 0 else list(reversed(args.sizes))
        for size in order:
            rate = model_rate(predictors[size], size, args.batches)
            decode = decode_ms(blobs, size)
            runs.append(
                {"round": round_, "size": size, "model_images_s": rate, "decode_ms": decode}
            )
            print(f"round {round_} {size} px: model {rate:.1f} images/s, decode {decode:.2f} ms")
    print("\nsize  model images/s (best)  decode ms (best)  model+decode ms/image  vs first")
    best = {}
    for size in args.sizes:
        mine = [r for r in runs if r["size"] == size]
        rate = max(r["model_images_s"] for r in mine)
        decode = min(r["decode_ms"] for r in mine)
        best[size] = {"model_images_s": rate, "decode_ms": decode, "ms": 1000 / rate + decode}
    first = best[args.sizes[0]]["ms"]
    for size, b in best.items():
        print(f"{size:4d}  {b['model_images_s']:21.1f}  {b['decode_ms']:16.2f}  "
              f"{b['ms']:21.2f}  {first / b['ms']:7.2f}x")  # fmt: skip
    save_result(args.out, {"runs": runs, "best": best})


if __name__ == "__main__":
    main()
