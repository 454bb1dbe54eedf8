"""The model stage alone on CPU: Keras, XLA and OpenVINO on the same MobileNet, same batches.

    python scripts/bench_model.py [--batch-size 64] [--seconds 8]

Compares Keras' `predict_on_batch` (what `--runtime keras` runs), the same model under
`tf.function(jit_compile=True)` (XLA), and the OpenVINO runtime (`--runtime openvino`, the
default on a CPU), and prints the worst cosine between each one's features and Keras'.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

from imgsim_dask.models import build_model, resolve_weights
from imgsim_dask.runtime import KerasPredictor, OpenVINOPredictor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--seconds", type=float, default=8.0, help="timed per runtime")
args = parser.parse_args()

model = build_model(resolve_weights("mobilenet", "random"), "/tmp")
pixels = np.random.default_rng(0).integers(0, 256, (args.batch_size, 224, 224, 3), np.uint8)
xla = tf.function(lambda t: model(t, training=False), jit_compile=True)
runs = {
    "keras predict_on_batch": KerasPredictor(model),
    "tf.function jit_compile=True": lambda batch: xla(batch).numpy(),
    "openvino (float32, latency hint, uint8 in)": OpenVINOPredictor.from_keras(model),
}


def unit(features):
    return features / np.linalg.norm(features, axis=1, keepdims=True)


reference = unit(runs["keras predict_on_batch"](pixels.astype(np.float32)))
for name, run in runs.items():
    x = pixels.astype(getattr(run, "input_dtype", np.float32))  # OpenVINO takes uint8
    cosine = np.einsum("ij,ij->i", unit(run(x)), reference).min()
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        run(x)
        images += len(x)
    rate = images / (time.perf_counter() - started)
    print(f"{name}: {rate:.1f} images/s (batch {len(x)}), min cosine vs keras {cosine:.7f}")
