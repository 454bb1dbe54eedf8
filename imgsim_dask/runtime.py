"""Runtimes: what executes the built Keras model on a worker.

- `keras`: Keras' own `predict_on_batch` (TensorFlow); the runtime for GPUs.
- `openvino`: the same model exported to OpenVINO IR by Keras (`model.export(...,
  format="openvino")`) and compiled for the CPU in float32, about 2x Keras' speed on CPU
  for MobileNet with features equal to cosine 1 - 1e-6 (docs/benchmarks.md).
- `auto` (default): `openvino` on a worker whose Keras backend is TensorFlow, TensorFlow
  sees no GPU and openvino is installed; else `keras`. Each worker decides for itself.

Both take pixels 0..255 of shape (batch, size, size, 3) as `input_dtype` and return float32
features.

The exported IR is cached per model, weights, pooling, input size and code (`ir_cache_dir`), and
OpenVINO caches the compiled model beside it, so the second command on a machine neither
builds the Keras model (nor imports TensorFlow) nor compiles again (`load_predictor`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ImgsimError, opt
from .models import keras_cache_dir

if TYPE_CHECKING:
    import keras

    from .models import Weights

logger = logging.getLogger(__name__)

GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # CUDA, WSL's GPU, ROCm
IR_FORMAT = 1  # bump when what is cached changes meaning


class KerasPredictor:
    """Keras' `predict_on_batch`."""

    name = "keras"
    input_dtype = np.float32

    def __init__(self, model):
        self.model = model
        self.dim = int(model.output_shape[-1])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(batch), np.float32)


class OpenVINOPredictor:
    """The model as OpenVINO IR (taking uint8 pixels, converted inside the graph on all cores:
    7-10% faster than a float32 copy made in numpy first), compiled for the CPU in float32
    with the latency hint: one stream using every core, the best single-batch throughput on
    a small CPU. With `cache_dir`, OpenVINO keeps the compiled model there and loads it
    instead of compiling again."""

    name = "openvino"
    input_dtype = np.uint8

    def __init__(self, ir_path: str, cache_dir: str | None = None):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if cache_dir is not None:
            config["CACHE_DIR"] = cache_dir
        self.compiled = ov.Core().compile_model(ir_path, "CPU", config)
        self.dim = int(self.compiled.outputs[0].get_partial_shape()[-1].get_length())

    @classmethod
    def from_keras(cls, model: keras.Model) -> OpenVINOPredictor:
        """Export a built Keras model and compile it (nothing cached)."""
        with tempfile.TemporaryDirectory(prefix="imgsim-openvino-") as tmp:
            ir_path = os.path.join(tmp, "model.xml")
            export_ir(model, ir_path)
            return cls(ir_path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # one request per call: a compiled model may serve several threads, a request may not
        return self.compiled.create_infer_request().infer(batch)[0]


def export_ir(model: keras.Model, ir_path: str) -> None:
    """Write `model` as OpenVINO IR at `ir_path` (weights in the .bin beside it, float32 as
    built), its input taking uint8 pixels."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="imgsim-export-") as tmp:
        exported = os.path.join(tmp, "model.xml")
        model.export(exported, format="openvino", verbose=False)
        preprocess = ov.preprocess.PrePostProcessor(ov.Core().read_model(exported))
        preprocess.input().tensor().set_element_type(ov.Type.u8)
        ov.save_model(preprocess.build(), ir_path, compress_to_fp16=False)


def ir_cache_dir() -> Path:
    """Where exported IRs and compiled models are kept: `imgsim/openvino` under Keras' cache
    directory (`$KERAS_HOME`, default `~/.keras`)."""
    return keras_cache_dir() / "imgsim" / "openvino"


def ir_key(weights: Weights, pooling: str, image_size: int) -> str:
    """The cache entry of a model: its weights, pooling, input size, the code that builds it
    and the versions that export it. Any change makes a new entry; nothing stale is read."""
    package = Path(__file__).parent
    code = hashlib.sha256()
    for path in [*sorted((package / "models").rglob("*.py")), package / "descriptor.py"]:
        code.update(path.read_bytes())
    basis = {
        "format": IR_FORMAT,
        "weights": weights.token,
        "pooling": pooling,
        "image_size": image_size,
        "code": code.hexdigest(),
        "versions": [_version(p) for p in ("openvino", "keras", "tensorflow")],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:24]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def cached_openvino(
    weights: Weights, pooling: str, image_size: int, build: Callable[[], keras.Model]
) -> OpenVINOPredictor:
    """The OpenVINO predictor of a model, from its cached IR where one exists; else `build()`
    is called, exported and cached (atomically: workers on one machine may race). A cache
    that cannot be written is only logged: the IR is then compiled from a temporary copy."""
    entry = ir_cache_dir() / f"{weights.model}-{ir_key(weights, pooling, image_size)}"
    compiled = str(ir_cache_dir() / "compiled")
    if (entry / "model.xml").is_file():
        return OpenVINOPredictor(str(entry / "model.xml"), compiled)
    model = build()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as exc:
        logger.warning("cannot cache the OpenVINO model in %s: %s", entry.parent, exc)
        return OpenVINOPredictor.from_keras(model)
    try:
        export_ir(model, str(staging / "model.xml"))
        try:
            staging.rename(entry)  # atomic; fails if another worker's is already there
        except OSError:
            pass
        if (entry / "model.xml").is_file():
            return OpenVINOPredictor(str(entry / "model.xml"), compiled)
        return OpenVINOPredictor(str(staging / "model.xml"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str) -> str:
    """The runtime `auto` means on this worker (`runtime` is checked by ExtractOptions).
    Where no GPU device exists, TensorFlow could see none, so it is not imported to ask."""
    if runtime == "openvino" and not openvino_available():
        raise ImgsimError(
            f"{opt('runtime')} openvino: the openvino package is not installed on the "
            f"model worker (pip install openvino), or use {opt('runtime')} keras"
        )
    if runtime != "auto":
        return runtime
    if keras_backend() != "tensorflow" or not openvino_available():
        return "keras"  # JAX, torch: Keras' OpenVINO export of those needs TensorFlow or torch
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return "openvino"
    import tensorflow as tf

    return "keras" if tf.config.list_physical_devices("GPU") else "openvino"


def keras_backend() -> str:
    """Keras' backend, read as Keras reads it (`KERAS_BACKEND`, else `keras.json` in its
    cache directory, else tensorflow) unless Keras is already imported."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    try:
        config = json.loads((keras_cache_dir() / "keras.json").read_text())
    except (OSError, ValueError):
        return "tensorflow"
    return str(config.get("backend", "tensorflow")) if isinstance(config, dict) else "tensorflow"


Predictor = KerasPredictor | OpenVINOPredictor


def make_predictor(model: keras.Model, runtime: str = "auto") -> Predictor:
    """A predictor running the built Keras `model` with `runtime` on this worker."""
    if resolve_runtime(runtime) == "openvino":
        return OpenVINOPredictor.from_keras(model)
    return KerasPredictor(model)


def load_predictor(
    weights: Weights,
    pooling: str,
    image_size: int,
    runtime: str,
    build: Callable[[], keras.Model],
) -> Predictor:
    """The predictor of a model under `runtime` on this worker; `build()` makes its Keras
    model, called only where no cached IR serves (`cached_openvino`)."""
    if resolve_runtime(runtime) == "openvino":
        return cached_openvino(weights, pooling, image_size, build)
    return KerasPredictor(build())
