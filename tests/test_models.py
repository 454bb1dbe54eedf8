"""Model registry and weights resolution: explicit file, Keras cache, failed download, random;
weights files checked on the driver; package weights hashed."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgsim_dask import cli
from imgsim_dask.errors import WeightsError
from imgsim_dask.models import build_model, get_spec, resolve_weights
from imgsim_dask.models import efficientnet_lite as lite
from imgsim_dask.models.mobilenet import WEIGHTS_FILE, build_mobilenet, weight_shapes

from support.cli import assert_usage_error, imgsim


def test_specs():
    assert get_spec("mobilenet").dim == 1024 and get_spec("mobilenet").threshold == 0.845
    assert get_spec("efficientnet-lite0").dim == 1280
    with pytest.raises(WeightsError, match="choose one of: mobilenet, efficientnet-lite0"):
        get_spec("resnet")


def test_download_failure_names_every_way_out(tmp_path, monkeypatch, capfd):
    """No cache, no path, no network: one line naming the cause, `weights` (--weights in the
    CLI), the cache path and the offline model; Keras' "Downloading data from" goes to stderr,
    not into stdout.

    The resolver is patched, so the attempted download never leaves this process.
    """
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    attempts = []

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(WeightsError) as info:
        resolve_weights("mobilenet", None)
    message = str(info.value)
    assert attempts, "the Keras download path was not tried"
    assert "\n" not in message
    for hint in ("with weights PATH", str(tmp_path / "models"), "use model efficientnet-lite0"):
        assert hint in message
    assert "--" not in message
    flags = info.value.render(lambda name: cli.FLAGS.get(name, name))
    assert "with --weights PATH" in flags and "use --model efficientnet-lite0" in flags
    assert "download failed: [Errno -2] Name or service not known)" in message
    assert capfd.readouterr().out == ""


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_keras_cache_is_used_and_loaded(tmp_path, monkeypatch, mobilenet_h5):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / WEIGHTS_FILE).write_bytes(mobilenet_h5.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    weights = resolve_weights("mobilenet", None)
    assert (
        weights.description.startswith("keras cache") and weights.data == mobilenet_h5.read_bytes()
    )

    from_cache = build_model(weights, str(tmp_path))
    explicit = build_model(resolve_weights("mobilenet", str(mobilenet_h5)), str(tmp_path))
    random = build_model(resolve_weights("mobilenet", "random"), str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
    a, b, c = (unit(m.predict_on_batch(pixels)) for m in (from_cache, explicit, random))
    assert a.shape == (2, 1024)
    assert np.allclose(a, b, atol=1e-6)
    assert (a * c).sum(axis=1).max() < 0.99  # other weights, other features


def test_random_weights_are_deterministic_and_loud(tmp_path, caplog):
    weights = resolve_weights("mobilenet", "random")
    assert "RANDOM WEIGHTS" in caplog.text and weights.is_random
    pixels = np.full((1, 224, 224, 3), 128, np.float32)
    one, two = (
        np.asarray(build_model(weights, str(tmp_path)).predict_on_batch(pixels)) for _ in range(2)
    )
    assert np.array_equal(one, two)


def test_partial_batches_use_a_few_small_shapes_with_the_same_features():
    """A partition with 3 `ok` rows runs a batch of 8, not 64, and gets the same features."""
    from imgsim_dask.embed import batch_rows, embed_pixels
    from imgsim_dask.runtime import KerasPredictor

    assert [batch_rows(n, 64) for n in (1, 3, 8, 9, 33, 64)] == [8, 8, 8, 16, 64, 64]
    assert batch_rows(5, 4) == 4
    model = build_model(resolve_weights("mobilenet", "random"), "")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    padded = np.zeros((64, 224, 224, 3), np.float32)
    padded[:3] = pixels
    full = model.predict_on_batch(padded)[:3]
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    assert np.allclose(embed_pixels(KerasPredictor(model), pixels, 64), full, atol=1e-5)


def test_architectures_without_keras_match_the_keras_models():
    """The driver's shape checks describe exactly the models the workers build."""
    backbone = build_mobilenet(None).get_layer("mobilenet_1.00_224")
    assert weight_shapes() == [tuple(w.shape) for w in backbone.weights]
    model = lite.build_efficientnet_lite0(include_top=True)
    assert lite.layer_shapes(include_top=True) == {
        layer.name: [tuple(w.shape) for w in layer.weights]
        for layer in model.layers
        if layer.weights
    }


def test_weights_files_are_told_apart_by_content(tmp_path, mobilenet_h5):
    """Any name works: the loader is chosen by what the file holds, and a wrong file is one line."""
    torch_file = tmp_path / "lite0.bin"
    shutil.copy(lite.checkpoint_path(), torch_file)
    assert resolve_weights("efficientnet-lite0", str(torch_file)).suffix == ".pth"
    legacy = tmp_path / "legacy.bin"
    shutil.copy(mobilenet_h5, legacy)
    assert resolve_weights("mobilenet", str(legacy)).suffix == ".h5"
    keras3 = tmp_path / "keras3.bin"  # Keras 3 layout under a name Keras would refuse
    backbone = build_mobilenet(None).get_layer("mobilenet_1.00_224")
    backbone.load_weights(mobilenet_h5)
    backbone.save_weights(tmp_path / "m.weights.h5")
    (tmp_path / "m.weights.h5").rename(keras3)
    weights = resolve_weights("mobilenet", str(keras3))
    assert weights.suffix == ".weights.h5"
    pixels = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
    a, b = (
        unit(
            build_model(resolve_weights("mobilenet", str(path)), str(tmp_path)).predict_on_batch(
                pixels
            )
        )
        for path in (keras3, legacy)
    )
    assert np.allclose(a, b, atol=1e-6)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(torch_file.read_bytes()[:200_000])
    for model, path, fragment in [
        ("mobilenet", torch_file, "is a PyTorch checkpoint; mobilenet needs Keras HDF5"),
        ("efficientnet-lite0", truncated, "is not efficientnet-lite0 weights: truncated"),
        ("efficientnet-lite0", keras3, "does not fit efficientnet-lite0: it holds 135 arrays"),
    ]:
        with pytest.raises(WeightsError, match=re.escape(fragment)) as info:
            resolve_weights(model, str(path))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "model, weights, fragment",
    [
        ("mobilenet", "some.jpg", "some.jpg is not Keras HDF5 weights (.h5, .weights.h5)"),
        ("efficientnet-lite0", "some.jpg", "or a PyTorch checkpoint (.pth)"),
        ("efficientnet-lite0", "mobilenet.h5", "does not fit efficientnet-lite0"),
    ],
)
def test_wrong_weights_stop_extract_in_one_line_before_the_store(
    tmp_path, mobilenet_h5, model, weights, fragment
):
    """`imgsim extract --weights some.jpg`: exit 2, one line, no folder left in the store."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "some.jpg")
    shutil.copy(mobilenet_h5, tmp_path / "mobilenet.h5")
    (tmp_path / "in.csv").write_text("id,url\n1,some.jpg\n")
    store = tmp_path / "store"
    store.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsim_dask",
            "extract",
            "in.csv",
            "--name",
            "p",
            "--store",
            "store",
            "--workers",
            "1",
            "--no-progress",
            "--model",
            model,
            "--weights",
            weights,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgsim: error: --weights file"), result.stderr
    assert fragment in lines[0], lines[0]
    assert list(store.iterdir()) == []


def test_a_weights_error_names_the_parameter_in_python_and_the_flag_in_the_cli(
    tmp_path, monkeypatch
):
    """`extract(weights=...)` says `weights`, `imgsim extract --weights` says `--weights`;
    both before any cluster is started."""
    from imgsim_dask import driver

    (tmp_path / "in.csv").write_text("id,url\n1,a.jpg\n")

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(driver, "connect", no_cluster)
    with pytest.raises(WeightsError) as info:
        driver.extract(
            str(tmp_path / "in.csv"), "x", str(tmp_path / "store"), weights="/nonexistent.h5"
        )
    message = "cannot read weights file /nonexistent.h5: No such file or directory"
    assert str(info.value) == message and "--weights" not in str(info.value)
    assert not (tmp_path / "store" / "x").exists()
    result = imgsim(
        "extract",
        "in.csv",
        "--name",
        "x",
        "--store",
        "store",
        "--weights",
        "/nonexistent.h5",
        "--no-progress",
        cwd=tmp_path,
    )
    assert_usage_error(result, message.replace("weights file", "--weights file"))


def test_package_weights_are_hashed_and_checked_without_tensorflow(tmp_path):
    """meta.json's `weights_sha256` is the checkpoint's, though its bytes are not shipped."""
    weights = resolve_weights("efficientnet-lite0", None)
    assert weights.data is None and re.fullmatch("[0-9a-f]{64}", weights.sha256)
    with open(lite.checkpoint_path(), "rb") as f:
        assert weights.sha256 == hashlib.file_digest(f, "sha256").hexdigest()
    assert resolve_weights("efficientnet-lite0", "random").sha256 == ""
    # resume compares plans: package weights stay planned by name, as before they had a hash,
    # so a source started before can still be resumed
    from imgsim_dask.driver import source_plan
    from imgsim_dask.ingest import inspect_csv
    from imgsim_dask.options import ExtractOptions

    (tmp_path / "in.csv").write_text("id,url\n1,a.jpg\n")
    source = inspect_csv(str(tmp_path / "in.csv"))
    assert source_plan(source, ExtractOptions(), weights, 1, 1280).weights == weights.description
    (tmp_path / "some.jpg").write_bytes(b"\xff\xd8\xff\xe0 not weights")
    check = (
        "import sys\n"
        "from imgsim_dask.models import resolve_weights\n"
        "w = resolve_weights('efficientnet-lite0', None)\n"
        "resolve_weights('efficientnet-lite0', sys.argv[1])\n"
        "try:\n"
        "    resolve_weights('mobilenet', 'some.jpg')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "print(w.sha256, sorted({'keras', 'tensorflow', 'h5py'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, lite.checkpoint_path()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out == ["WeightsError", weights.sha256, "['h5py']"]
