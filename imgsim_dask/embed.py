"""Embed: run the CNN on decoded uint8 pixels in fixed-shape batches, on `GPU`-tagged workers.

The model lives in a `WorkerPlugin` (one per model and weights), built lazily behind a lock
the first time a task needs it, so it is loaded once per worker process and never on
workers that only fetch.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
from distributed import WorkerPlugin, get_worker

from .fetch import OK, FetchedPartition
from .models import Weights, build_model


class ModelPlugin(WorkerPlugin):
    """Carries the weights to every worker and holds the model once built."""

    idempotent = True  # registering the same weights again is a no-op

    def __init__(self, weights: Weights):
        self.weights = weights
        self.name = f"imgsim-model-{weights.token}"
        self._model = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"weights": self.weights, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["weights"])

    def setup(self, worker):
        self._workdir = worker.local_directory

    def model(self):
        """The Keras model, built on first use."""
        with self._lock:
            if self._model is None:
                self._model = build_model(self.weights, self._workdir)
            return self._model


def batch_rows(images: int, batch_size: int) -> int:
    """Rows of the batch that carries `images` images: the smallest power of two that holds
    them (at least 8), at most `batch_size`. A handful of fixed shapes, so the model is never
    retraced for each odd size, and a partition with few `ok` rows (a crawl full of 404s)
    does not pay for a whole padded batch."""
    return min(batch_size, max(8, 1 << (images - 1).bit_length()))


def embed_pixels(model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """L2-normalised float32 features of uint8 images, predicted in batches of fixed shapes."""
    dim = model.output_shape[-1]
    out = np.empty((len(pixels), dim), np.float32)
    buffer = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start:start + batch_size]
        batch = buffer[:batch_rows(len(chunk), batch_size)]
        batch[: len(chunk)] = chunk
        batch[len(chunk):] = 0
        out[start:start + len(chunk)] = np.asarray(model.predict_on_batch(batch))[: len(chunk)]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def embed_partition(fetched: FetchedPartition, plugin_name: str, batch_size: int
                    ) -> tuple[np.ndarray, pd.DataFrame, dict[str, float]]:
    """Features for every row of a partition (NaN rows for failures), its row table, and
    the seconds its fetch and embed tasks took."""
    started = time.perf_counter()
    model = get_worker().plugins[plugin_name].model()
    features = np.full((len(fetched.rows), model.output_shape[-1]), np.nan, np.float32)
    ok = (fetched.rows["status"] == OK).to_numpy()
    if ok.any():
        features[ok] = embed_pixels(model, fetched.pixels, batch_size)
    return features, fetched.rows, {"fetch": fetched.seconds,
                                    "embed": time.perf_counter() - started}
