"""Demo: a small offline image set, served over real HTTP from 127.0.0.1.

The photographs ship with scikit-image. A "catalogue" holds the originals; an "uploads"
collection holds edited copies (resized, cropped, re-encoded, watermarked, greyscale,
mirrored) of some of them plus photographs the catalogue does not have. Matching uploads
against the catalogue should find exactly the copies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from .models import get_spec
from .options import ClusterOptions, ExtractOptions, MatchOptions
from .pairs import MatchResult
from .workflow import run

CATALOGUE = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "camera.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "brick.png",
    "page.png",
)
DEMO_MODEL = "efficientnet-lite0"  # its weights install offline
UNRELATED = ("moon.png", "grass.png", "gravel.png", "clock_motion.png")


def _edits() -> dict[str, Callable[[Image.Image], Image.Image]]:
    """Named edits that keep an image 'the same picture' for a person."""

    def watermark(image: Image.Image) -> Image.Image:
        image = image.copy()
        draw = ImageDraw.Draw(image)
        w, h = image.size
        draw.rectangle((w // 20, h - h // 6, w // 2, h - h // 20), fill=(255, 255, 255))
        draw.text((w // 16, h - h // 7), "(c) imgsim demo", fill=(0, 0, 0))
        return image

    def crop(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.crop((w // 10, h // 10, w - w // 10, h - h // 10))

    return {
        "resized": lambda im: im.resize((im.width // 2, im.height // 2)),
        "cropped": crop,
        "recompressed": lambda im: im,  # saved at JPEG quality 15 below
        "watermarked": watermark,
        "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
        "mirrored": ImageOps.mirror,
    }


def _copies() -> list[tuple[str, str]]:
    """(catalogue file, edit) of each edited copy among the uploads."""
    edits = list(_edits())
    return [(f, edits[i % len(edits)]) for i, f in enumerate(CATALOGUE[: len(edits) + 2])]


def sample_path(filename: str) -> Path:
    """A sample photograph shipped inside scikit-image (read from disk, never downloaded)."""
    import skimage.data

    return Path(skimage.data.__file__).parent / filename


def build_images(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the demo images under `root`; return the catalogue and uploads tables (id,
    title, file)."""
    root.mkdir(parents=True, exist_ok=True)
    catalogue, uploads = [], []
    for filename in CATALOGUE:
        stem = filename.rsplit(".", 1)[0]
        image = Image.open(sample_path(filename)).convert("RGB")
        image.save(root / f"{stem}.jpg", quality=92)
        catalogue.append({"id": f"cat-{stem}", "title": stem, "file": f"{stem}.jpg"})
    edits = _edits()
    for filename, edit in _copies():
        stem = filename.rsplit(".", 1)[0]
        image = edits[edit](Image.open(sample_path(filename)).convert("RGB"))
        image.save(root / f"{stem}-{edit}.jpg", quality=15 if edit == "recompressed" else 90)
        uploads.append(
            {"id": f"up-{stem}-{edit}", "title": f"{stem} ({edit})", "file": f"{stem}-{edit}.jpg"}
        )
    for filename in UNRELATED:
        stem = filename.rsplit(".", 1)[0]
        Image.open(sample_path(filename)).convert("RGB").save(root / f"{stem}.jpg", quality=90)
        uploads.append({"id": f"up-{stem}", "title": stem, "file": f"{stem}.jpg"})
    return pd.DataFrame(catalogue), pd.DataFrame(uploads)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the block runs; yield the
    base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="imgsim-demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_csvs(workdir: Path, base_url: str) -> tuple[Path, Path]:
    """Build the images and write `catalogue.csv` and `uploads.csv` twice: in `served/`
    with URLs at `base_url` (what the demo extracts; they work only while it serves), and in
    `workdir` with the images' paths (to try commands on afterwards). Return the served ones."""
    catalogue, uploads = build_images(workdir / "images")
    (workdir / "served").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in (("catalogue", catalogue), ("uploads", uploads)):
        files = table.pop("file")
        table.assign(url="images/" + files).to_csv(workdir / f"{name}.csv", index=False)
        path = workdir / "served" / f"{name}.csv"
        table.assign(url=base_url + "/" + files).to_csv(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


def verdict(result: MatchResult) -> str:
    """Whether the demo found what it should: each edited copy its original, and nothing for
    the photographs the catalogue does not have."""
    matched = dict(zip(result.pairs["uploads_id"], result.pairs["catalogue_id"]))
    unrelated = {f"up-{name.rsplit('.', 1)[0]}" for name in UNRELATED}
    copies = {
        f"up-{stem}-{edit}": f"cat-{stem}"
        for stem, edit in ((f.rsplit(".", 1)[0], edit) for f, edit in _copies())
    }
    found = sum(matched.get(key) == original for key, original in copies.items())
    wrongly = sorted(key for key in unrelated if key in matched)
    copies_line = f"{found} of {len(copies)} edited copies found their original"
    if wrongly:
        return f"{copies_line}; {len(wrongly)} unrelated uploads matched: {', '.join(wrongly)}"
    return f"{copies_line}; the {len(unrelated)} unrelated uploads correctly have no match"


def run_demo(
    root: Path, cluster: ClusterOptions, progress: bool, on_serving: Callable[[str], object] = print
) -> MatchResult:
    """The whole demo: serve the images, extract both collections, match uploads to the
    catalogue (each upload's best match at the model's threshold), write `matches.csv`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with serve_directory(root / "images") as base_url:
        catalogue, uploads = write_csvs(root, base_url)
        on_serving(f"serving {len(list((root / 'images').iterdir()))} demo images at {base_url}")
        options = ExtractOptions(
            model=DEMO_MODEL, partition_rows=8, batch_size=8, overwrite=True, progress=progress
        )
        result = run(
            str(uploads),
            str(catalogue),
            ["uploads", "catalogue"],
            str(root / "store"),
            out=root / "matches.csv",
            cluster=cluster,
            options=options,
            match_options=MatchOptions(top_k=1, threshold=get_spec(DEMO_MODEL).threshold),
        )
    spec = get_spec(DEMO_MODEL)  # its threshold is given as such, for top_k
    result.threshold_from = f"the default of {DEMO_MODEL}, {spec.default_descriptor}"
    result.about["threshold_from"] = result.threshold_from
    return result
