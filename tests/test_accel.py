"""The device kernel (`match.device`): its own machinery, and its results under the JAX backend.

There is no GPU here: the Keras ops run on the CPU device, which exercises every line that a
GPU would run except the device's own arithmetic. test_match.py holds the kernel's exactness
against the dense reference with `scorer="keras"` (TensorFlow backend), in-process and on
the cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import imgsim_dask
from imgsim_dask.errors import InputError
from imgsim_dask.match import device, match_features
from imgsim_dask.options import MatchOptions


def test_device_copies_are_made_once_per_run_and_freed_at_its_end(monkeypatch):
    made = []
    to_device = device._to_device
    monkeypatch.setattr(
        device, "_to_device", lambda host: made.append(len(host)) or to_device(host)
    )
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((50, 8), np.float32), rng.standard_normal((30, 8), np.float32)
    options = MatchOptions(threshold=0.2, block_rows=10, slice_rows=12, scorer="keras")
    got = match_features(a, b, options)
    assert made == [12, 12, 6]  # 5 blocks, 3 slices: each slice copied once
    assert device.DEVICE_SLICES._tensors == {}
    expected = match_features(a, b, MatchOptions(threshold=0.2, scorer="numpy"))
    assert set(zip(got.row_a, got.row_b)) == set(zip(expected.row_a, expected.row_b))


def test_release_drops_only_its_own_run():
    slices = device.DeviceSlices()
    host = np.ones((2, 3), np.float32)
    first = slices.get("aaaa", 0, host)
    assert slices.get("aaaa", 0, host) is first
    slices.get("aaaa", 1, host)
    slices.get("bbbb", 0, host)
    assert slices.release("aaaa") == 2
    assert list(slices._tensors) == [("bbbb", 0)]


def test_a_released_run_keeps_no_new_copies():
    """A score task still running when its (failed) run was released must not leave a copy
    behind that no release would free."""
    slices = device.DeviceSlices()
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    slices.release("aaaa")
    late = slices.get("aaaa", 3, host)
    np.testing.assert_array_equal(np.asarray(late), host)
    assert slices._tensors == {}
    slices.get("bbbb", 3, host)
    assert list(slices._tensors) == [("bbbb", 3)]


def test_device_copies_on_the_cluster_are_freed(client):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((40, 8), np.float32)
    options = MatchOptions(top_k=2, block_rows=16, slice_rows=16, scorer="keras")
    got = match_features(a, a, options, client=client, self_match=True)
    expected = match_features(a, a, MatchOptions(top_k=2, scorer="numpy"), self_match=True)
    assert set(zip(got.row_a, got.row_b)) == set(zip(expected.row_a, expected.row_b))
    held = client.run(lambda: len(device.DEVICE_SLICES._tensors))
    assert set(held.values()) == {0}


def test_full_float32_turns_tf32_off_inside_only():
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(True)
    with device.full_float32():
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    assert tf.config.experimental.tensor_float_32_execution_enabled()


def test_full_float32_from_two_threads_restores_tf32_only_when_both_left():
    import threading

    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(True)
    first_in, first_out = threading.Event(), threading.Event()
    seen = {}

    def first():
        with device.full_float32():
            first_in.set()
            first_out.wait(10)

    def second():
        first_in.wait(10)
        with device.full_float32():
            first_out.set()
            thread.join(10)  # the first has left: TF32 must still be off for this one
            seen["inside"] = tf.config.experimental.tensor_float_32_execution_enabled()

    thread = threading.Thread(target=first)
    other = threading.Thread(target=second)
    thread.start()
    other.start()
    other.join(20)
    assert seen == {"inside": False}
    assert tf.config.experimental.tensor_float_32_execution_enabled()


def test_torch_backend_is_refused_for_its_ties(monkeypatch, tmp_path):
    # torch is not installed here: the backend's name is patched; torch.topk does not
    # promise the lower index first among ties, which the module's semantics need
    import keras

    from imgsim_dask.errors import ImgsimError

    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ImgsimError, match="needs the TensorFlow or JAX Keras backend"):
        device.resolve_scorer("keras")
    (tmp_path / "version").write_text("NVRM version: stand-in")
    monkeypatch.setattr(device, "_NVIDIA_DRIVER", str(tmp_path / "version"))
    assert device.resolve_scorer("auto") == "numpy"


def test_auto_is_numpy_without_a_gpu_and_does_not_import_keras():
    script = (
        "import sys; from imgsim_dask.match.device import resolve_scorer; "
        "print(resolve_scorer('auto'), 'keras' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == ["numpy", "False"]


def test_auto_asks_keras_where_an_nvidia_driver_is_loaded(monkeypatch, tmp_path):
    # no NVIDIA driver here: a file stands in for /proc/driver/nvidia/version; the Keras
    # backend (TensorFlow, CPU only) then decides
    (tmp_path / "version").write_text("NVRM version: stand-in")
    monkeypatch.setattr(device, "_NVIDIA_DRIVER", str(tmp_path / "version"))
    assert device.resolve_scorer("auto") == "numpy"  # TensorFlow sees no GPU
    monkeypatch.setattr(device, "keras_sees_gpu", lambda: True)
    assert device.resolve_scorer("auto") == "keras"
    assert device.resolve_scorer("numpy") == "numpy"


@pytest.mark.slow
def test_the_device_kernel_under_jax_equals_the_reference():
    """What a GPU machine with JAX (and no TensorFlow) runs, on JAX's CPU device."""
    script = textwrap.dedent(
        """
        import jax, keras, numpy as np
        from jax import monitoring
        assert keras.backend.backend() == "jax"
        from imgsim_dask.match import device, match_features
        from imgsim_dask.options import MatchOptions
        from support.matching import MODES, assert_same, quantized, reference, score_blocks
        with device.full_float32():
            assert jax.config.jax_default_matmul_precision == "float32"
        # -0.0 and +0.0 tie (JAX's top_k alone ranks -0.0 lower)
        a, b = np.array([[1, 0]], np.float32), np.array([[-0.0, -3], [0, 3]], np.float32)
        got = match_features(a, b, MatchOptions(top_k=1, scorer="keras"))
        assert got.row_b.tolist() == [0], got
        # a second run on other data of the same shapes compiles (almost) nothing new
        compiles = []
        monitoring.register_event_duration_secs_listener(
            lambda event, duration, **kw: compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration" else None)
        for seed in (1, 2):
            x = np.random.default_rng(seed).standard_normal((1500, 16)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            compiles.clear()
            found = match_features(x, x[:1000], MatchOptions(threshold=0.3, block_rows=256,
                                                             slice_rows=400, scorer="keras"))
            assert len(found) > 1000
        assert len(compiles) <= 4, len(compiles)  # before the fix: one set per block
        rng = np.random.default_rng(7)
        for threshold, top_k in MODES:
            for self_match in (False, True):
                a = quantized(rng, 53)
                b = a if self_match else quantized(rng, 41)
                a[[3, 30]] = np.nan
                b[5] = 0.0
                options = MatchOptions(threshold=threshold, top_k=top_k, block_rows=17,
                                       slice_rows=9)
                assert_same(score_blocks(a, b, options, self_match, "keras"),
                            reference(a, b, threshold, top_k, self_match))
        print("ok")
        """
    )
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


def test_run_refuses_an_unknown_scorer_before_any_work(tmp_path):
    with pytest.raises(InputError, match="unknown scorer 'cupy'"):
        imgsim_dask.run(str(tmp_path / "never-read.csv"), store=str(tmp_path), scorer="cupy")
