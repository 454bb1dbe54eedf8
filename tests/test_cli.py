"""The `imgsim` command as a user runs it: real subprocesses, real local cluster, exit codes."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgsim_dask import open_source
from imgsim_dask.models import get_spec

from support.cli import assert_usage_error, imgsim
from support.http import jpeg_bytes


@pytest.mark.parametrize(
    "content, extra, fragment",
    [
        (None, [], "no such file"),
        ("", [], "empty"),
        ("id,url\n1,http://127.0.0.1/a.jpg\n", ["--url-col", "link"], "--url-col 'link'"),
        ("id;url\n1;http://127.0.0.1/a.jpg\n", [], "--delimiter ';'"),
        ("id,url\n", [], "no data rows"),
        ("id,url\n1,a.jpg\n", ["--weights", "/nonexistent/w.h5"], "cannot read --weights file"),
        ("id,url\n1,a.jpg\n".encode("utf-16"), [], "UTF-16LE text (byte order mark), not UTF-8"),
        (b"id,url\n1,caf\xe9.jpg\n", [], "not UTF-8 (byte 0xe9 on line 2)"),
        (jpeg_bytes(), [], "in.csv: this is a JPEG image, not a CSV file; give the CSV that lists"),
        (
            'id,title,url\n1,"12 inch,a.jpg\n2,b,c.jpg\n',
            [],
            "in.csv: a quoted field opened on line 2 is never closed",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, content, extra, fragment):
    csv = tmp_path / "in.csv"
    if isinstance(content, bytes):
        csv.write_bytes(content)
    elif content is not None:
        csv.write_text(content)
    weights = [] if "--weights" in extra else ["--weights", "random"]  # never a download here
    result = imgsim(
        "extract",
        csv,
        "--name",
        "x",
        "--store",
        tmp_path / "store",
        "--workers",
        "1",
        "--no-progress",
        *weights,
        *extra,
    )
    assert_usage_error(result, fragment)


def test_info_and_export_of_unknown_source(tmp_path):
    assert_usage_error(imgsim("info", "nope", "--store", tmp_path), "no source named 'nope'")
    assert_usage_error(
        imgsim("export", "nope", "--store", tmp_path, "--h5", tmp_path / "x.h5"), "no source named"
    )


NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "missing", "notes"]


@dataclass
class Extracted:
    root: Path  # the working folder: urls.csv, and what the commands write
    store: Path
    urls: list[str]
    result: subprocess.CompletedProcess  # the `imgsim extract` run


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, http_server) -> Extracted:
    """The issue's 'done' check: `imgsim extract` of 200 served URLs (some failing) on the
    default local cluster, into a store the other commands then read."""
    root = tmp_path_factory.mktemp("cli-web")
    urls = [f"{http_server}/{NAMES[i % len(NAMES)]}.jpg" for i in range(200)]
    pd.DataFrame({"id": range(200), "url": urls}).to_csv(root / "urls.csv", index=False)
    store = root / "store"
    result = imgsim(
        "extract",
        "urls.csv",
        "--name",
        "web",
        "--store",
        store,
        "--weights",
        "random",
        "--workers",
        "1",
        "--partition-rows",
        "64",
        "--no-progress",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return Extracted(root, store, urls, result)


@pytest.mark.slow
@pytest.mark.cluster
def test_extract_200_urls_on_the_default_local_cluster(extracted):
    """Every row accounted for."""
    result, store = extracted.result, extracted.store
    assert "dashboard: http://127.0.0.1:" in result.stderr
    assert "RANDOM WEIGHTS" in result.stderr
    assert "web: 200 rows" in result.stdout
    assert "  fetch " in result.stdout and "images/s per task)" in result.stdout

    source = open_source(store, "web")
    rows = source.rows()
    assert rows["row"].tolist() == list(range(200))
    expected = [
        "http_404" if n == "missing" else "not_image" if n == "notes" else "ok"
        for n in (NAMES[i % len(NAMES)] for i in range(200))
    ]
    assert rows["status"].tolist() == expected
    features = source.features[:]
    assert np.isnan(features[rows["status"] != "ok"]).all()
    assert not np.isnan(features[rows["status"] == "ok"]).any()


@pytest.mark.slow
@pytest.mark.cluster
def test_info_of_the_extracted_source(extracted):
    info = imgsim("info", "web", "--store", extracted.store)
    assert info.returncode == 0 and "http_404" in info.stdout and "mobilenet" in info.stdout


@pytest.mark.slow
@pytest.mark.cluster
def test_export_writes_the_h5_and_the_fields_file(extracted):
    exported = imgsim(
        "export", "web", "--store", extracted.store, "--h5", extracted.root / "web.h5"
    )
    assert exported.returncode == 0, exported.stderr
    assert (extracted.root / "web_fields.csv").is_file()


@pytest.mark.slow
@pytest.mark.cluster
def test_export_refuses_an_h5_name_without_h5_suffix(extracted):
    root = extracted.root
    assert_usage_error(
        imgsim("export", "web", "--store", extracted.store, "--h5", root / "urls.csv"),
        "name the HDF5 file .h5 or .hdf5",
    )
    assert pd.read_csv(root / "urls.csv")["url"].tolist() == extracted.urls  # not written over


@pytest.mark.slow
@pytest.mark.cluster
def test_dedupe_device_kernel_finds_what_the_cpu_kernel_finds(extracted):
    """dedupe with the device kernel (Keras ops; on this machine's CPU) finds what the CPU
    kernel finds, every served image's copies among it."""
    root = extracted.root
    found = {}
    for scorer in ("keras", "numpy"):
        dupes = imgsim(
            "dedupe",
            "web",
            "--store",
            extracted.store,
            "--thresh",
            "0.99",
            "--scorer",
            scorer,
            "--out",
            root / f"{scorer}.csv",
        )
        assert dupes.returncode == 0, dupes.stderr
        pairs = pd.read_csv(root / f"{scorer}.csv")
        found[scorer] = set(zip(pairs.row_a, pairs.row_b))
    assert found["keras"] == found["numpy"]
    rows = open_source(extracted.store, "web").rows()
    ok = rows[rows.status == "ok"]
    copies = {(a, b) for _, same in ok.groupby("url") for a in same.row for b in same.row if a < b}
    assert copies and copies <= found["keras"]


@pytest.mark.slow
@pytest.mark.cluster
def test_dedupe_refuses_an_unknown_scorer(extracted):
    assert_usage_error(
        imgsim("dedupe", "web", "--store", extracted.store, "--scorer", "cupy"),
        "'cupy' is not one of 'auto', 'numpy', 'keras'",
    )


@pytest.mark.slow
@pytest.mark.cluster
def test_demo_command_finds_every_edited_copy_and_nothing_else(tmp_path):
    """The README's main job, as `make demo` runs it: offline, on the embedded local cluster."""
    result = imgsim("demo", "--dir", tmp_path / "demo", "--no-progress", "--workers", "1")
    assert result.returncode == 0, result.stderr
    uploads = pd.read_csv(tmp_path / "demo" / "uploads.csv")
    copies = {
        row.id: "cat-" + row.id.split("-")[1]
        for row in uploads.itertuples()
        if row.title.endswith(")")
    }
    assert 0 < len(copies) < len(uploads)  # edited copies and unrelated photos
    matches = pd.read_csv(tmp_path / "demo" / "matches.csv")
    assert dict(zip(matches["uploads_id"], matches["catalogue_id"])) == copies
    threshold = get_spec("efficientnet-lite0").threshold
    assert (matches["similarity"] >= threshold).all()
    assert f"{len(copies)} pairs" in result.stdout
    assert (
        f"{len(copies)} of {len(copies)} edited copies found their original; the "
        f"{len(uploads) - len(copies)} unrelated uploads correctly have no match"
    ) in result.stdout
    assert (
        f"kept pairs with similarity >= {threshold:g} (the default of efficientnet-lite0, "
        "rmac-trim)" in result.stdout
    )
    # the CSVs left behind list the images' paths, so they work after the demo's server is gone
    assert all((tmp_path / "demo" / path).is_file() for path in uploads["url"])
    page = tmp_path / "demo" / "review.html"
    assert f"-> {page}" in result.stdout  # make demo says where its review page is
    assert page.read_text().count("data:image/jpeg;base64,") >= 2 * len(copies)


@pytest.mark.slow
@pytest.mark.cluster
def test_fetch_policy_flags_reach_the_workers(tmp_path, http_server):
    """`--public-only` refuses the loopback server (no fetch), `--schemes http` refuses paths;
    `--runtime keras` reaches the model worker."""
    csv = tmp_path / "in.csv"
    csv.write_text(f"id,url\n1,{http_server}/chelsea.jpg\n2,{tmp_path / 'x.jpg'}\n")
    result = imgsim(
        "extract",
        csv,
        "--name",
        "guarded",
        "--store",
        tmp_path / "store",
        "--weights",
        "random",
        "--no-progress",
        "--workers",
        "1",
        "--public-only",
        "--schemes",
        "http,https",
        "--deadline",
        "5",
        "--runtime",
        "keras",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert open_source(tmp_path / "store", "guarded").meta.runtime == ["keras"]
    rows = open_source(tmp_path / "store", "guarded").rows()
    assert rows["status"].tolist() == ["blocked", "blocked"]
    assert "not a public address" in rows["error"][0]
    assert "imgsim: warning: no row gave an image (2 blocked)\n" in result.stderr


def test_run_names_must_match_the_csvs(tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("id,url\n1,a.jpg\n")
    assert_usage_error(imgsim("run", csv, "--names", "a,b", "--store", tmp_path), "--names needs 1")
    assert_usage_error(
        imgsim("run", csv, csv, "--names", "a", "--store", tmp_path),
        "--names needs 2 name(s), got 1",
    )


def test_plain_imgsim_prints_its_help():
    result = imgsim()
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: ") and "  dedupe  " in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["extract", "in.csv", "--name", "a", "--schemes", ""], "--schemes: name at least one"),
        (["extract", "in.csv", "--name", "a", "--schemes", " , "], "--schemes: name at least one"),
        (
            [
                "extract",
                "in.csv",
                "--name",
                "a",
                "--scheduler",
                "tcp://127.0.0.1:1",
                "--scheduler-file",
                "s.json",
            ],
            "--scheduler and --scheduler-file both name a scheduler",
        ),
        (
            [
                "extract",
                "in.csv",
                "--name",
                "a",
                "--scheduler",
                "tcp://127.0.0.1:1",
                "--workers",
                "2",
            ],
            "--workers sizes the local cluster; a remote scheduler's cluster has its own workers",
        ),
    ],
)
def test_options_that_contradict_themselves_are_refused(tmp_path, args, fragment):
    (tmp_path / "in.csv").write_text("id,url\n1,a.jpg\n")
    assert_usage_error(imgsim(*args, "--store", tmp_path / "store", cwd=tmp_path), fragment)
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_a_wrong_url_column_is_named_when_no_row_gives_an_image(tmp_path):
    (tmp_path / "in.csv").write_text("id,url\nimg1,a.jpg\nimg2,b.jpg\n")
    result = imgsim(
        "extract",
        "in.csv",
        "--name",
        "ids",
        "--url-col",
        "id",
        "--store",
        tmp_path / "store",
        "--weights",
        "random",
        "--no-progress",
        "--workers",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr  # the rows are accounted for, as not_found
    assert (
        "imgsim: warning: no row gave an image (2 not_found); is 'id' the column of URLs? "
        "(--url-col)"
    ) in result.stderr
