"""The score kernel on an accelerator: the same semantics as `match`'s numpy kernel, through
Keras ops on the worker's Keras backend (TensorFlow, JAX or torch) and its default device.

Only the sgemm and the per-row selection run on the device; what comes back to the host is
the pairs at or above the threshold (threshold mode) or each row's k best of a slice (top-k
mode), which `match` then filters and merges exactly as on the CPU. B's slices are copied to
the device once per run and stay there (`DeviceSlices`), so a run moves B over PCIe once per
worker, not once per block. Matmuls run in full float32 (TF32 off): the pairs are the
CPU kernel's, up to float32 rounding. Ties at a row's k-th place go to the lower B row, as
on the CPU: `top_k` keeps the lower index first under TensorFlow and JAX (tested); torch's
`topk` does not promise it.

Scorers: `numpy` (the CPU kernel), `keras` (this one, on whatever device Keras uses), `auto`:
`keras` on a worker where an NVIDIA driver is loaded and the Keras backend sees a GPU, else
`numpy` (without importing Keras). Each worker decides for itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from .errors import InputError

SCORERS = ("auto", "numpy", "keras")
_NVIDIA_DRIVER = "/proc/driver/nvidia/version"


def check_scorer(scorer: str) -> None:
    """Refuse a scorer name that does not exist (on the driver, before any work)."""
    if scorer not in SCORERS:
        raise InputError(f"unknown scorer {scorer!r}; choose one of: {', '.join(SCORERS)}")


def resolve_scorer(scorer: str) -> str:
    """The scorer `auto` means in this process."""
    check_scorer(scorer)
    if scorer != "auto":
        return scorer
    if not os.path.exists(_NVIDIA_DRIVER):  # no GPU: never pay for importing Keras
        return "numpy"
    return "keras" if keras_sees_gpu() else "numpy"


def keras_sees_gpu() -> bool:
    """True when the Keras backend's default device in this process is a GPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


@contextmanager
def full_float32() -> Iterator[None]:
    """Matmuls in full float32 while inside: no TF32 (which TensorFlow and JAX use on GPUs
    by default and which moves a cosine by up to ~1e-3)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("float32"):
            yield
    elif backend == "tensorflow":
        import tensorflow as tf

        was = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(was)
    elif backend == "torch":
        import torch

        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was
    else:
        yield


class DeviceSlices:
    """Device copies of B's slices, by slice key, kept for the run that made them.

    One per process (`DEVICE_SLICES`): score tasks of one run share it; the driver frees a
    run's copies when the run ends (`release(token)`; keys end in `-<token>`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tensors: dict[str, object] = {}

    def get(self, key: str, host: np.ndarray):
        with self._lock:
            tensor = self._tensors.get(key)
            if tensor is None:
                tensor = self._tensors[key] = _to_device(host)
            return tensor

    def release(self, token: str) -> int:
        """Drop every copy of run `token`; return how many there were."""
        with self._lock:
            keys = [k for k in self._tensors if k.endswith(f"-{token}")]
            for key in keys:
                del self._tensors[key]
            return len(keys)


DEVICE_SLICES = DeviceSlices()


def _to_device(host: np.ndarray):
    from keras import ops

    return ops.convert_to_tensor(np.ascontiguousarray(host, dtype=np.float32))


def device_copies(slices: Sequence[np.ndarray], keys: Sequence[str] | None) -> list:
    """Device tensors of host slices: kept by key for the run, or (no keys) for this call."""
    if keys is None:
        return [_to_device(s) for s in slices]
    return [DEVICE_SLICES.get(key, s) for key, s in zip(keys, slices)]


def release_device_slices(token: str) -> int:
    """Free run `token`'s device copies in this process (run on every worker at the end)."""
    return DEVICE_SLICES.release(token)


def threshold_candidates(a: np.ndarray, slices: Sequence, limit: float, skips: Sequence[int]
                         ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per slice j: `(j, flat, sims)`, the flat indices into `a @ slices[j][skip:].T` of the
    similarities >= `limit`, and those similarities (unclipped), computed on the device.

    `slices` are device tensors; a slice whose skip covers it is passed over.
    """
    from keras import ops

    with full_float32():
        a_device = ops.convert_to_tensor(a)
        for j, (b, skip) in enumerate(zip(slices, skips)):
            if skip >= b.shape[0]:
                continue
            sims = ops.reshape(ops.matmul(a_device, ops.transpose(b[skip:])), (-1,))
            flat = ops.nonzero(ops.greater_equal(sims, limit))[0]
            yield (j, ops.convert_to_numpy(flat).astype(np.int64),
                   ops.convert_to_numpy(ops.take(sims, flat)).astype(np.float32))


def top_k_candidates(a: np.ndarray, ids: np.ndarray, slices: Sequence, starts: Sequence[int],
                     valids: Sequence[np.ndarray], k: int, self_match: bool
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per slice: `(sims, cols)`, each row's min(k, slice rows) best columns of the slice
    (similarity clipped to [-1, 1], descending; ties: the lower column first), computed on
    the device. Invalid columns and, in a self match, the row itself come back as -inf.
    """
    from keras import ops

    with full_float32():
        a_device = ops.convert_to_tensor(a)
        for b, start, valid in zip(slices, starts, valids):
            cols = int(b.shape[0])
            sims = ops.clip(ops.matmul(a_device, ops.transpose(b)), -1.0, 1.0)
            if not valid.all():
                sims = ops.where(ops.convert_to_tensor(valid)[None, :], sims, -np.inf)
            if self_match and start <= int(ids[-1]) and int(ids[0]) < start + cols:
                own = np.clip(ids - start, -1, cols).astype(np.int32)  # the row's own column
                columns = ops.arange(cols, dtype="int32")
                sims = ops.where(ops.equal(columns[None, :], ops.convert_to_tensor(own)[:, None]),
                                 -np.inf, sims)
            values, cols_best = ops.top_k(sims, min(k, cols), sorted=True)
            yield (ops.convert_to_numpy(values).astype(np.float32),
                   ops.convert_to_numpy(cols_best).astype(np.int64))
