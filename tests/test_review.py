"""The review page, in a real headless Chromium (no GPU, no network): thumbnails stored at
extraction, the pairs of a real match, the slider, the histogram, escaping, large tables,
and pages for sources that are missing or have no thumbnails."""

from __future__ import annotations

import html
import io
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgsim_dask import ExtractOptions, FetchOptions, extract, match_sources
from imgsim_dask.pairs import PAIRS_RECORD
from imgsim_dask.review import review_pairs
from imgsim_dask.store import open_source

from support.browser import chromium
from support.cli import imgsim

ARTIFACTS = Path(os.environ.get("IMGSIM_TEST_ARTIFACTS", "test-artifacts"))
INJECTED = (
    "<script>window.__pwned = 1</script>",
    '" onerror="window.__pwned = 2',
    '<img src=x onerror="window.__pwned = 3">',
)
ROWS = [  # (file, title): near-duplicates of chelsea, a missing file, a text file
    ("astronaut.jpg", INJECTED[0]),
    ("chelsea.jpg", INJECTED[1]),
    ("chelsea_small.png", INJECTED[2]),
    ("coffee.jpg", "coffee"),
    ("rocket.jpg", "rocket"),
    ("camera.jpg", "camera"),
    ("missing.jpg", "gone"),
    ("notes.jpg", "not an image"),
]


@pytest.fixture(scope="module")
def matched(tmp_path_factory, http_server, client):
    """A source of real photos (some near-duplicates, two failed rows), deduplicated into a
    pairs .parquet file at a low threshold (pairs of many similarities)."""
    root = tmp_path_factory.mktemp("review")
    csv = root / "products.csv"
    pd.DataFrame(
        {
            "sku": [f"sku-{i}" for i in range(len(ROWS))],
            "title": [title for _, title in ROWS],
            "url": [f"{http_server}/{name}" for name, _ in ROWS],
        }
    ).to_csv(csv, index=False)
    store = root / "store"
    extract(str(csv), "products", str(store), cluster=client, model="efficientnet-lite0")
    pairs = root / "pairs.parquet"
    result = match_sources("products", store=str(store), out=pairs, cluster=client, threshold=0.2)
    return root, store, pairs, result


@contextmanager
def opened(page: Path):
    """Headless Chromium on `page` once its script has run; no console errors by the end."""
    driver = chromium()
    try:
        _open(driver, page)
        yield driver
        assert _console_errors(driver) == []
    finally:
        driver.quit()


def _open(driver, page: Path) -> None:
    driver.get(page.resolve().as_uri())
    deadline = time.monotonic() + 20
    while driver.execute_script("return document.body.dataset.ready") != "1":
        assert time.monotonic() < deadline, "the page's script never finished"
        time.sleep(0.1)


def _loaded_thumbnails(driver, expected: int) -> int:
    """Thumbnails in #pairs that the browser has decoded, once `expected` or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#pairs img.thumb')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        if loaded >= expected or time.monotonic() > deadline:
            return loaded
        time.sleep(0.1)


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_thumbnails_are_stored_for_ok_rows_only(matched):
    _, store, _, _ = matched
    source = open_source(str(store), "products")
    rows = source.rows()
    assert "thumbnail" not in rows.columns  # the row table a user reads stays lean
    thumbs = source.thumbnails(rows["row"].to_numpy())
    for status, thumb in zip(rows["status"], thumbs):
        if status != "ok":
            assert thumb is None
            continue
        image = Image.open(io.BytesIO(thumb))
        assert image.format == "JPEG" and max(image.size) == 128
    assert sum(t is not None for t in thumbs) == 6


def test_no_thumbnails_stores_none(matched, http_server, client):
    root, store, _, _ = matched
    csv = root / "two.csv"
    csv.write_text(f"url\n{http_server}/coffee.jpg\n{http_server}/rocket.jpg\n")
    options = ExtractOptions(model="efficientnet-lite0", fetch=FetchOptions(thumbnails=False))
    source = extract(str(csv), "plain", str(store), cluster=client, options=options)
    assert not source.has_thumbnails and source.thumbnails(np.array([0, 1])) == [None, None]
    assert source.status_counts() == {"ok": 2}


def test_the_page_shows_the_match_and_filters_it_in_the_browser(matched, tmp_path):
    root, store, pairs, result = matched
    metadata = json.loads(pq.read_schema(pairs).metadata[PAIRS_RECORD])
    assert metadata["sources"] == ["products", "products"] and metadata["threshold"] == 0.2
    page = tmp_path / "review.html"
    done = imgsim("review", pairs, "--out", page)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "warning" not in done.stderr
    assert f"of {len(result.pairs)} pairs shown" in done.stdout
    text = html.unescape(page.read_text())
    assert not re.search(r"""(src|href)=["']?https?:""", text)  # nothing loads from elsewhere
    assert "Content-Security-Policy" in text and "default-src 'none'" in text

    with opened(page) as driver:
        assert _loaded_thumbnails(driver, 2 * len(result.pairs)) == 2 * len(result.pairs)
        bars = driver.execute_script("return document.querySelectorAll('#histogram rect.kept')")
        heights = [float(b.get_attribute("height")) for b in bars]
        assert len(bars) == 50 and sum(h > 0 for h in heights) >= 1

        similarities = result.pairs["similarity"].to_numpy()
        for value in (0.2, round(float(np.median(similarities)), 3), 0.99):  # the 0.001 steps
            driver.execute_script(
                "const s = document.getElementById('threshold'); s.value = arguments[0];"
                "s.dispatchEvent(new Event('input'));",
                value,
            )
            visible = driver.execute_script(
                "return [...document.querySelectorAll('#pairs .pair')]"
                ".filter(c => !c.hidden && c.offsetParent !== null).length"
            )
            assert visible == int((np.round(similarities, 4) >= value).sum()), value

        body = driver.find_element("tag name", "body").text
        for payload in INJECTED:  # shown as text, never run
            assert payload in body
        assert driver.execute_script("return window.__pwned") is None
        assert "http_404" in body and "not_image" in body  # the failed rows
        ARTIFACTS.mkdir(exist_ok=True)
        driver.execute_script(
            "const s = document.getElementById('threshold'); s.value = 0.2;"
            "s.dispatchEvent(new Event('input'));"
        )
        assert driver.save_screenshot(str(ARTIFACTS / "review.png"))


def test_dedupe_groups_and_borderline_band(matched, tmp_path):
    _, store, pairs, result = matched
    page = tmp_path / "groups.html"
    written = review_pairs(pairs, page)
    with opened(page) as driver:
        groups = driver.execute_script(
            "return [...document.querySelectorAll('#groups .group')]"
            ".map(g => g.querySelectorAll('.member').length)"
        )
        expected = result.pairs.groupby("group").apply(
            lambda g: len(set(g["row_a"]) | set(g["row_b"]))
        )
        assert groups == sorted(expected.tolist(), reverse=True)  # largest first
        band = driver.execute_script(
            "return [...document.querySelectorAll('#borderline-pairs .pair')]"
            ".map(c => Number(c.dataset.s))"
        )
        assert all(abs(s - 0.2) <= 0.03 + 1e-6 for s in band)
    assert written.pairs_shown == len(result.pairs)


@pytest.mark.slow
def test_a_large_table_gives_a_bounded_page_quickly(tmp_path, client):
    """100,000 pairs of imported vectors (no thumbnails): at most --max-pairs-shown on the
    page, placeholders, one warning line, within 10 s of `imgsim review`."""
    rng = np.random.default_rng(3)
    store = tmp_path / "store"
    for name, rows in (("left", 2000), ("right", 3000)):
        vectors = tmp_path / f"{name}.npy"
        np.save(vectors, rng.normal(size=(rows, 32)).astype(np.float32))
        made = imgsim("import", name, vectors, "--store", store)
        assert made.returncode == 0, made.stderr
    pairs = tmp_path / "pairs.parquet"
    match_sources("left", "right", str(store), out=pairs, cluster=client, top_k=50)
    assert len(pd.read_parquet(pairs, columns=["row_a"])) == 100_000

    page = tmp_path / "large.html"
    started = time.perf_counter()
    done = imgsim("review", pairs, "--out", page)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert seconds <= 10, seconds
    warnings = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2 and all("no thumbnails" in w for w in warnings), done.stderr
    assert "2000 of 100000 pairs shown" in done.stdout
    with opened(page) as driver:
        cards = driver.execute_script("return document.querySelectorAll('.pair').length")
        assert cards <= 2000
        assert driver.execute_script("return document.querySelectorAll('img.thumb').length") == 0
        assert driver.execute_script("return document.querySelectorAll('.placeholder').length")


def test_sources_missing_from_the_store_still_give_a_page(matched, tmp_path):
    _, store, pairs, result = matched
    moved = tmp_path / "pairs.parquet"
    table = pq.read_table(pairs)
    about = json.loads(table.schema.metadata[PAIRS_RECORD])
    about["store"] = str(tmp_path / "no-store-here")
    pq.write_table(
        table.replace_schema_metadata({**table.schema.metadata, PAIRS_RECORD: json.dumps(about)}),
        moved,
    )
    page = tmp_path / "missing.html"
    done = imgsim("review", moved, "--out", page)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the store" in lines[0], done.stderr
    with opened(page) as driver:
        placeholders = driver.execute_script(
            "return document.querySelectorAll('#pairs .placeholder').length"
        )
        assert placeholders == 2 * len(result.pairs)
        assert "sku-" in driver.find_element("tag name", "body").text  # fields from the table


def test_unusable_pairs_files_are_one_line(tmp_path, matched):
    _, _, pairs, _ = matched
    csv = tmp_path / "pairs.csv"
    pd.read_parquet(pairs).to_csv(csv, index=False)
    plain = tmp_path / "plain.parquet"
    pd.read_parquet(pairs).to_parquet(plain)
    for given, fragment in (
        (csv, "a CSV does not record which sources"),
        (plain, "no record of the sources"),
        (tmp_path / "nothing.parquet", "no such file"),
    ):
        done = imgsim("review", given, "--out", tmp_path / "r.html")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert fragment in done.stderr
    done = imgsim("review", pairs, "--out", tmp_path / "review.txt")
    assert done.returncode == 2 and "name it .html" in done.stderr


def test_a_folder_page_loads_its_thumbnails_from_beside_it(matched, tmp_path):
    _, _, pairs, result = matched
    written = review_pairs(pairs, f"{tmp_path / 'page'}/")
    assert written.path == tmp_path / "page" / "index.html"
    files = sorted(p.name for p in (tmp_path / "page" / "thumbs").iterdir())
    assert files and all(name.endswith(".jpg") for name in files)
    assert "data:image/jpeg" not in written.path.read_text()
    with opened(written.path) as driver:
        assert _loaded_thumbnails(driver, 2 * len(result.pairs)) == 2 * len(result.pairs)


def test_a_dataset_match_gives_the_same_page_as_its_file(matched, tmp_path, client):
    """`imgsim review DIR/`: the page reads the dataset's record, parts and groups."""
    _, store, pairs, from_file = matched
    dataset = f"{tmp_path / 'pairs'}/"
    match_sources("products", store=str(store), out=dataset, cluster=client, threshold=0.2)
    page = review_pairs(dataset, tmp_path / "dataset.html")
    assert page.total_pairs == page.pairs_shown == len(from_file.pairs)
    with opened(page.path) as driver:
        shown = driver.execute_script(
            "return [...document.querySelectorAll('#pairs .pair .sim')].map(s => s.textContent)"
        )
        groups = driver.execute_script("return document.querySelectorAll('#groups .group').length")
        expected = sorted(from_file.pairs["similarity"], reverse=True)
        assert shown == [f"{round(float(s), 4):.3f}" for s in expected]
        assert groups == from_file.pairs["group"].nunique()
        assert _loaded_thumbnails(driver, 2 * len(shown)) == 2 * len(shown)
