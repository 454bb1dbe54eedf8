"""Fetch + decode against a real HTTP server on 127.0.0.1 and real files: one status per row."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image, features

from imgsim_dask.decode import decode_image, sniff_format
from imgsim_dask.fetch import fetch_partition
from imgsim_dask.options import FetchOptions
from imgsim_dask.schema import OK, TRANSIENT_STATUSES, RowFailure


def test_partition_statuses(http_server, image_dir):
    urls = [
        f"{http_server}/chelsea.jpg",
        f"{http_server}/missing.jpg",
        f"{http_server}/status/503",
        f"{http_server}/notes.jpg",
        str(image_dir / "coffee.jpg"),
        f"file://{image_dir / 'chelsea_small.png'}",
        "rocket.jpg",  # relative: resolved against base_dir
        "",
        "ftp://example.invalid/a.jpg",
        str(image_dir / "absent.jpg"),
    ]
    rows = pd.DataFrame({"row": range(len(urls)), "url": urls})
    options = FetchOptions(base_dir=str(image_dir), retries=1)
    fetched = fetch_partition(rows, "url", options)
    table = fetched.rows
    assert table["status"].tolist() == [
        OK,
        "http_404",
        "http_5xx",
        "not_image",
        OK,
        OK,
        OK,
        "bad_url",
        "blocked",
        "not_found",
    ]
    assert table.loc[0, "http_status"] == 200 and table.loc[1, "http_status"] == 404
    assert (table.loc[table.status != OK, "error"] != "").all()
    assert table.loc[0, ["width", "height"]].tolist() == [451, 300]
    assert len(table.loc[0, "sha256"]) == 64
    assert fetched.pixels.shape == (4, 224, 224, 3) and fetched.pixels.dtype == np.uint8
    assert table["row"].tolist() == list(range(len(urls)))  # order and fields kept


MALFORMED = [
    "http://[::1/x.jpg",  # unclosed IPv6 bracket
    "http://[zz]/x.jpg",  # brackets around something that is no IP address
    "http://a\u2100b/x.jpg",  # a host that NFKC normalisation changes
    "file://[::1/x.jpg",
    "http://127.0.0.1:99999/x.jpg",  # port out of range
    "img/che\x00lsea.jpg",  # NUL byte in a local path
    "file:///img/che%00lsea.jpg",  # ... and in a file URL
]


def test_malformed_urls_and_paths_fail_their_rows_only(http_server, image_dir):
    good = [f"{http_server}/chelsea.jpg", str(image_dir / "coffee.jpg"), "rocket.jpg"]
    urls = [good[0], *MALFORMED[:4], good[1], *MALFORMED[4:], good[2]]
    options = FetchOptions(base_dir=str(image_dir), retries=0)
    fetched = fetch_partition(pd.DataFrame({"url": urls}), "url", options)
    table = fetched.rows
    assert table["status"].tolist() == [OK, *["bad_url"] * 4, OK, *["bad_url"] * 3, OK]
    failed = table[table.status != OK]
    assert failed["error"].str.len().between(1, 300).all()
    assert failed["http_status"].isna().all()
    assert table.loc[table.status == OK, "width"].notna().all()
    alone = fetch_partition(pd.DataFrame({"url": good}), "url", options).pixels
    assert fetched.pixels.shape == (3, 224, 224, 3) and np.array_equal(fetched.pixels, alone)


def test_same_image_same_pixels_by_http_and_path(http_server, image_dir):
    rows = pd.DataFrame({"url": [f"{http_server}/astronaut.jpg", str(image_dir / "astronaut.jpg")]})
    pixels = fetch_partition(rows, "url", FetchOptions()).pixels
    assert np.array_equal(pixels[0], pixels[1])


def test_non_image_rows_have_no_size_or_hash_by_http_or_path(http_server, image_dir, tmp_path):
    """`bytes`/`sha256` describe a whole body that was read: a non-image is abandoned after
    its first bytes by HTTP and from a file alike (a local one used to get both)."""
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "short.jpg").write_bytes(b"hello")
    jpeg = (image_dir / "coffee.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    urls = [
        f"{http_server}/notes.jpg",
        str(image_dir / "notes.jpg"),
        f"file://{image_dir / 'notes.jpg'}",
        str(tmp_path / "empty.jpg"),
        str(tmp_path / "short.jpg"),
        str(tmp_path / "half.jpg"),
    ]
    table = fetch_partition(pd.DataFrame({"url": urls}), "url", FetchOptions()).rows
    assert table["status"].tolist() == ["not_image"] * 5 + ["decode_error"]
    assert table["bytes"][:5].isna().all() and (table["sha256"][:5] == "").all()
    assert table.loc[0, "http_status"] == 200
    # read whole, then failed to decode: size and hash are kept
    assert table.loc[5, "bytes"] == len(jpeg) // 2 and len(table.loc[5, "sha256"]) == 64


def _fetch_in_thread(urls: list[str], options: FetchOptions, seconds: float = 10):
    """fetch_partition in a thread; None if it has not returned within `seconds`."""
    result = []
    thread = threading.Thread(
        target=lambda: result.append(fetch_partition(pd.DataFrame({"url": urls}), "url", options)),
        daemon=True,
    )
    thread.start()
    thread.join(seconds)
    return result[0].rows if result else None


def _release_fifo_reader(fifo):
    """Give a reader blocked in open(fifo) its writer and EOF (no reader: nothing to do)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_get_a_permanent_status_unread(tmp_path, image_dir):
    """Directories, devices and FIFOs are `not_a_file` (not `not_found`, not the transient
    `io_error`), refused from stat before anything is opened or read."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "link.jpg").symlink_to(tmp_path / "folder.jpg")
    urls = [
        str(tmp_path / "folder.jpg"),
        str(tmp_path / "link.jpg"),
        str(fifo),
        f"file://{fifo}",
        str(image_dir / "coffee.jpg"),
    ]
    kinds = ["directory", "directory", "FIFO", "FIFO"]
    if os.path.exists("/dev/zero"):
        urls.insert(-1, "/dev/zero")
        kinds.append("character device")
    try:
        table = _fetch_in_thread(urls, FetchOptions(max_bytes=2**20))
    finally:
        _release_fifo_reader(fifo)
    assert table is not None, "a special file was opened or read"
    assert table["status"].tolist() == ["not_a_file"] * len(kinds) + [OK]
    for error, kind in zip(table["error"], kinds):
        assert f"is a {kind}, not a regular file" in error
    assert "not_a_file" not in TRANSIENT_STATUSES  # --retry-failed leaves them alone
    assert table["bytes"][:-1].isna().all()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_file_swapped_for_a_fifo_after_the_stat_is_not_waited_on(tmp_path, image_dir, monkeypatch):
    """The check is made again on the opened file, which is opened without waiting for a
    writer: a path that is a regular file at `stat` and a FIFO at `open` cannot hang a row."""
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stat_before_the_swap(path, *args, **kwargs):
        if str(path) == str(fifo):
            return real_stat(image_dir / "coffee.jpg")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_before_the_swap)
    try:
        table = _fetch_in_thread([str(fifo)], FetchOptions(), seconds=5)
    finally:
        _release_fifo_reader(fifo)
    assert table is not None, "opening the FIFO waited for a writer"
    assert table["status"].tolist() == ["not_a_file"]


def test_read_timeout_is_a_status(http_server):
    rows = pd.DataFrame({"url": [f"{http_server}/slow/3"]})
    fetched = fetch_partition(rows, "url", FetchOptions(read_timeout=0.5, retries=0))
    assert fetched.rows["status"].tolist() == ["timeout"]


def test_size_cap(http_server, image_dir):
    big = (image_dir / "astronaut.jpg").stat().st_size
    rows = pd.DataFrame({"url": [f"{http_server}/astronaut.jpg", str(image_dir / "astronaut.jpg")]})
    fetched = fetch_partition(rows, "url", FetchOptions(max_bytes=big // 2))
    assert fetched.rows["status"].tolist() == ["too_large", "too_large"]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_decode_modes_to_rgb(mode):
    image = (
        Image.new("RGB", (300, 200), (200, 30, 60)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (300, 200), 1000)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    pixels, width, height, _ = decode_image(buffer.getvalue(), 224)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert (width, height) == (300, 200)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    buffer = io.BytesIO()
    Image.new("I;16", (300, 200), 32896).save(buffer, format="PNG")  # mid-grey in 16 bits
    pixels, _, _, _ = decode_image(buffer.getvalue(), 224)
    assert np.all(pixels == 128)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF"])
def test_sniffed_formats_decode(image_format):
    if image_format == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80), (200, 30, 60)).save(buffer, format=image_format)
    assert sniff_format(buffer.getvalue()) == image_format
    pixels, width, height, _ = decode_image(buffer.getvalue(), 224)
    assert (width, height) == (120, 80) and pixels.shape == (224, 224, 3)


def test_animated_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    pixels, _, _, _ = decode_image(buffer.getvalue(), 224)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


@pytest.mark.parametrize(
    "data",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # would reach Ghostscript
        b"8BPS\x00\x01" + bytes(64),  # Photoshop
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"",
    ],
    ids=["eps", "psd", "svg", "empty"],
)
def test_only_listed_formats_reach_a_decoder(data):
    with pytest.raises(RowFailure) as info:
        decode_image(data, 224)
    assert info.value.status == "not_image"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "side, max_pixels",
    [(30_000, None), (100, 9_999)],
    ids=["over-pillow-error-limit", "over-max-pixels"],
)
def test_bomb_refused_before_decoding(side, max_pixels):
    options = {"max_pixels": max_pixels} if max_pixels else {}
    with pytest.raises(RowFailure) as info:
        decode_image(_png_header_only(side, side), 224, **options)
    assert info.value.status == "bomb"


def test_exif_orientation_applied():
    image = Image.new("RGB", (400, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 200, 100))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: the white half ends on top
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    pixels, _, _, _ = decode_image(buffer.getvalue(), 224)
    assert pixels[:100].mean() > 200 and pixels[124:].mean() < 50


def test_truncated_jpeg_is_decode_error(image_dir):
    data = (image_dir / "coffee.jpg").read_bytes()
    with pytest.raises(RowFailure) as info:
        decode_image(data[: len(data) // 2], 224)
    assert info.value.status == "decode_error"
    assert str(info.value).startswith("cannot decode the JPEG image: "), str(info.value)


@pytest.mark.parametrize(
    "data", [b"\xff\xd8\xff" + bytes(50), b"GIF89a" + bytes(20), b"II*\0" + bytes(30)]
)
def test_a_damaged_image_is_named_without_pillow_reprs(data):
    """Pillow's "UnidentifiedImageError: cannot identify image file <_io.BytesIO object at
    0x7f...>" once went into the row table as it was."""
    with pytest.raises(RowFailure) as info:
        decode_image(data, 224)
    assert info.value.status == "decode_error"
    name = {"\xff": "JPEG", "G": "GIF", "I": "TIFF"}[chr(data[0])]
    assert (
        str(info.value)
        == f"cannot decode the {name} image: its data is not valid (damaged or cut short?)"
    )
