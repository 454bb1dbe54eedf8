"""Embed: run the CNN on decoded uint8 pixels in fixed-shape batches, on `GPU`-tagged workers.

The model lives in a `WorkerPlugin` (one per model and weights), built lazily behind a lock
the first time a task needs it, so it is loaded once per worker process and never on
workers that only fetch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from distributed import Worker, WorkerPlugin, get_worker

from .fetch import FetchedPartition
from .models import Weights, build_model
from .quiet import filtered_native_stderr
from .runtime import Predictor, load_predictor
from .schema import OK


class ModelPlugin(WorkerPlugin):
    """Carries the weights to every worker and holds the model once built."""

    idempotent = True  # registering the same model again is a no-op

    def __init__(self, weights: Weights, runtime: str, pooling: str, image_size: int):
        self.weights = weights
        self.runtime = runtime
        self.pooling = pooling
        self.image_size = image_size
        self.name = f"imgsim-model-{weights.token}-{runtime}-{pooling}-{image_size}"
        self._unbuilt()

    def _unbuilt(self) -> None:
        self._predictor: Predictor | None = None
        self._lock = threading.Lock()
        self._workdir = ""

    def __getstate__(self) -> dict:
        return {
            "weights": self.weights,
            "runtime": self.runtime,
            "pooling": self.pooling,
            "image_size": self.image_size,
            "name": self.name,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._unbuilt()

    def setup(self, worker: Worker) -> None:
        self._workdir = worker.local_directory

    def predictor(self) -> Predictor:
        """The model under its runtime (`runtime.py`), loaded on first use."""
        with self._lock:
            if self._predictor is None:
                with filtered_native_stderr():  # TensorFlow's start-up chatter
                    self._predictor = load_predictor(
                        self.weights, self.pooling, self.image_size, self.runtime, self._build
                    )
            return self._predictor

    def _build(self):
        return build_model(self.weights, self._workdir, self.pooling, self.image_size)


def batch_rows(images: int, batch_size: int) -> int:
    """Rows of the batch that carries `images` images: the smallest power of two that holds
    them (at least 8), at most `batch_size`. A handful of fixed shapes, so the model is never
    retraced for each odd size, and a partition with few `ok` rows (a crawl full of 404s)
    does not pay for a whole padded batch."""
    return min(batch_size, max(8, 1 << (images - 1).bit_length()))


def embed_pixels(predictor, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """L2-normalised float32 features of uint8 images, predicted in batches of fixed shapes."""
    out = np.empty((len(pixels), predictor.dim), np.float32)
    buffer = np.zeros((batch_size, *pixels.shape[1:]), predictor.input_dtype)
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        batch = buffer[: batch_rows(len(chunk), batch_size)]
        batch[: len(chunk)] = chunk
        batch[len(chunk) :] = 0
        out[start : start + len(chunk)] = predictor(batch)[: len(chunk)]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


@dataclass
class EmbeddedPartition:
    """Features for every row of a partition (NaN rows for failures), its row table, the
    seconds its fetch and embed tasks took, and the runtime that ran the model."""

    features: np.ndarray
    rows: pd.DataFrame
    seconds: dict[str, float]
    runtime: str


def embed_partition(
    fetched: FetchedPartition, plugin_name: str, batch_size: int
) -> EmbeddedPartition:
    """Run the model over a fetched partition's `ok` images."""
    started = time.perf_counter()
    plugin = get_worker().plugins[plugin_name]
    assert isinstance(plugin, ModelPlugin)
    predictor = plugin.predictor()
    features = np.full((len(fetched.rows), predictor.dim), np.nan, np.float32)
    ok = (fetched.rows["status"] == OK).to_numpy()
    if ok.any():
        features[ok] = embed_pixels(predictor, fetched.pixels, batch_size)
    return EmbeddedPartition(
        features,
        fetched.rows,
        {"fetch": fetched.seconds, "embed": time.perf_counter() - started},
        predictor.name,
    )
