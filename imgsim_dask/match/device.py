"""The score kernel on an accelerator: the same semantics as `match`'s numpy kernel, through
Keras ops on the worker's Keras backend (TensorFlow, JAX or torch) and its default device.

Only the sgemm and the per-row selection run on the device; what comes back to the host is
the pairs at or above the threshold (threshold mode) or each row's k best of a slice (top-k
mode), which `kernel` then filters and merges exactly as on the CPU. B's slices are copied to
the device once per run and stay there (`DeviceSlices`), so a run moves B over PCIe once per
worker, not once per block. Matmuls run in full float32 (TF32 off): the pairs are the
CPU kernel's, up to float32 rounding. Ties at a row's k-th place go to the lower B row, as
on the CPU: `top_k` keeps the lower index first under TensorFlow and JAX (tested; torch's
`topk` does not promise it, so torch is refused). Under JAX every device op has a shape
fixed by the block and slice shapes or rounded up to a power of two, so XLA compiles a
handful of kernels per run, not one per block.

Scorers: `numpy` (the CPU kernel), `keras` (this one, on whatever device Keras uses; the
TensorFlow and JAX backends), `auto`: `keras` on a worker where an NVIDIA driver is loaded
and the Keras backend sees a GPU, else `numpy` (without importing Keras). Each worker
decides for itself.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ..errors import ImgsimError, opt

BACKENDS = ("tensorflow", "jax")  # whose top_k breaks ties by the lower index
_NVIDIA_DRIVER = "/proc/driver/nvidia/version"


def resolve_scorer(scorer: str) -> str:
    """The scorer `auto` means in this process (`scorer` is checked by MatchOptions)."""
    if scorer == "numpy":
        return scorer
    if scorer == "auto" and not os.path.exists(_NVIDIA_DRIVER):  # never pay for Keras here
        return "numpy"
    import keras

    backend = keras.backend.backend()
    if backend not in BACKENDS:
        if scorer == "auto":
            return "numpy"
        raise ImgsimError(
            f"{opt('scorer')} keras needs the TensorFlow or JAX Keras backend, this "
            f"worker's is {backend}; use {opt('scorer')} numpy"
        )
    return "keras" if scorer == "keras" or keras_sees_gpu() else "numpy"


def keras_sees_gpu() -> bool:
    """True when the Keras backend (TensorFlow or JAX) has a GPU in this process."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    return False


_TF32_LOCK = threading.Lock()
_tf32_users = 0
_tf32_was = False


@contextmanager
def full_float32() -> Iterator[None]:
    """Matmuls in full float32 while inside: no TF32 (which TensorFlow and JAX use on GPUs
    by default and which moves a cosine by up to ~1e-3). Safe from several threads: under
    TensorFlow, whose switch is process-wide, the first to enter turns TF32 off and the
    last to leave restores it."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("float32"):
            yield
        return
    if backend != "tensorflow":
        yield
        return
    import tensorflow as tf

    global _tf32_users, _tf32_was
    with _TF32_LOCK:
        if _tf32_users == 0:
            _tf32_was = tf.config.experimental.tensor_float_32_execution_enabled()
            tf.config.experimental.enable_tensor_float_32_execution(False)
        _tf32_users += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _tf32_users -= 1
            if _tf32_users == 0:
                tf.config.experimental.enable_tensor_float_32_execution(_tf32_was)


def _matmul_t(a, b):
    """`a @ b.T` on the device, in full float32."""
    from keras import ops

    with full_float32():
        return ops.matmul(a, ops.transpose(b))


class DeviceSlices:
    """Device copies of B's slices, by (run, slice number), kept for the run that made them.

    One per process (`DEVICE_SLICES`): score tasks of one run share it; the driver frees a
    run's copies when the run ends (`release(run)`). A score task of a run already released
    (one still running when its run failed) gets a copy for its own call only, so nothing is
    left behind that no release would ever free.
    """

    _REMEMBERED_RUNS = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tensors: dict[tuple[str, int], object] = {}
        self._released: deque[str] = deque(maxlen=self._REMEMBERED_RUNS)

    def get(self, run: str, number: int, host: np.ndarray) -> object:
        with self._lock:
            tensor = self._tensors.get((run, number))
            if tensor is None:
                tensor = _to_device(host)
                if run not in self._released:
                    self._tensors[(run, number)] = tensor
            return tensor

    def release(self, run: str) -> int:
        """Drop every copy of `run` and keep none it asks for later; return how many there
        were."""
        with self._lock:
            self._released.append(run)
            keys = [key for key in self._tensors if key[0] == run]
            for key in keys:
                del self._tensors[key]
            return len(keys)


DEVICE_SLICES = DeviceSlices()


def _to_device(host: np.ndarray):
    """A float32 tensor in the device's memory (TensorFlow would keep it on the host and
    copy it to the GPU at every use)."""
    import keras
    from keras import ops

    tensor = ops.convert_to_tensor(np.ascontiguousarray(host, dtype=np.float32))
    if keras.backend.backend() == "tensorflow" and keras_sees_gpu():
        import tensorflow as tf

        with tf.device("/GPU:0"):
            tensor = tf.identity(tensor)
    return tensor


def device_copies(slices: Sequence[np.ndarray], run: str | None, numbers: Sequence[int]) -> list:
    """Device tensors of host slices (`numbers`: their slice numbers in B): kept for `run`,
    or (no run) for this call."""
    if run is None:
        return [_to_device(s) for s in slices]
    return [DEVICE_SLICES.get(run, number, s) for number, s in zip(numbers, slices)]


def release_device_slices(run: str) -> int:
    """Free `run`'s device copies in this process (run on every worker at the end)."""
    return DEVICE_SLICES.release(run)


def threshold_candidates(
    a: np.ndarray, slices: Sequence, limit: float, skips: Sequence[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per slice j: `(j, r, c, sims)`, where `a @ slices[j].T >= limit` (unclipped sims),
    computed on the device; `skips[j] >= len(slice)` passes slice j over.

    The device scores whole slices (no `skip` columns cut off: a new shape per block would
    mean a new compile under JAX); the caller drops what a skip would have.
    """
    from keras import ops

    a_device = ops.convert_to_tensor(a)
    for j, (b, skip) in enumerate(zip(slices, skips)):
        if skip >= b.shape[0]:
            continue
        sims = _matmul_t(a_device, b)
        r, c, values = _where_at_least(sims, limit)
        if len(r):
            yield j, r, c, values


def _where_at_least(sims, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns (int64) and values of the entries of 2-d `sims` >= `limit`, on the host.

    Under JAX the hits are gathered into a buffer whose length is the hit count rounded up
    to a power of two: a data-dependent length would compile new kernels for every block.
    """
    import keras
    from keras import ops

    hits = ops.greater_equal(sims, limit)
    if keras.backend.backend() != "jax":
        r, c = ops.nonzero(hits)
        values = ops.take(ops.reshape(sims, (-1,)), r * sims.shape[1] + c)
        return (
            ops.convert_to_numpy(r).astype(np.int64),
            ops.convert_to_numpy(c).astype(np.int64),
            ops.convert_to_numpy(values).astype(np.float32),
        )
    import jax.numpy as jnp

    count = int(jnp.count_nonzero(hits))
    if not count:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    size = 1 << (count - 1).bit_length()
    r, c = jnp.nonzero(hits, size=size, fill_value=0)  # per axis: int32 is enough
    values = sims[r, c]
    return (
        np.asarray(r)[:count].astype(np.int64),
        np.asarray(c)[:count].astype(np.int64),
        np.asarray(values)[:count].astype(np.float32),
    )


def top_k_candidates(
    a: np.ndarray,
    ids: np.ndarray,
    slices: Sequence,
    starts: Sequence[int],
    valids: Sequence[np.ndarray],
    k: int,
    self_match: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per slice: `(sims, cols)`, each row's min(k, slice rows) best columns of the slice
    (similarity clipped to [-1, 1], descending; ties: the lower column first), computed on
    the device. Invalid columns and, in a self match, the row itself come back as -inf.
    """
    from keras import ops

    a_device = ops.convert_to_tensor(a)
    for b, start, valid in zip(slices, starts, valids):
        cols = int(b.shape[0])
        sims = ops.clip(_matmul_t(a_device, b), -1.0, 1.0)
        sims = ops.where(ops.equal(sims, 0.0), 0.0, sims)  # -0.0 would rank below +0.0
        if not valid.all():
            sims = ops.where(ops.convert_to_tensor(valid)[None, :], sims, -np.inf)
        if self_match and start <= int(ids[-1]) and int(ids[0]) < start + cols:
            own = np.clip(ids - start, -1, cols).astype(np.int32)  # the row's own column
            columns = ops.arange(cols, dtype="int32")
            sims = ops.where(
                ops.equal(columns[None, :], ops.convert_to_tensor(own)[:, None]), -np.inf, sims
            )
        values, cols_best = ops.top_k(sims, min(k, cols), sorted=True)
        yield (
            ops.convert_to_numpy(values).astype(np.float32),
            ops.convert_to_numpy(cols_best).astype(np.int64),
        )
