"""`imgsim run` on sources that are already complete: nothing is extracted again, and no
weights are resolved (this machine has no internet: a MobileNet download would fail)."""

from __future__ import annotations

import re

import pytest

from imgsim_dask import extract

from support.cli import assert_usage_error, imgsim

pytestmark = pytest.mark.cluster


def test_run_on_complete_sources_resolves_no_weights(client, image_dir, tmp_path):
    for name in ("uploads", "catalogue"):
        (tmp_path / f"{name}.csv").write_text(
            "id,url\n"
            + "".join(f"{i},{image_dir / f}\n" for i, f in enumerate(["chelsea.jpg", "coffee.jpg"]))
        )
        extract(
            str(tmp_path / f"{name}.csv"),
            name,
            str(tmp_path / "store"),
            cluster=client,
            weights="random",
        )
    empty_cache = {"KERAS_HOME": str(tmp_path / "no-keras-cache")}

    def run_both():
        return imgsim(
            "run",
            "uploads.csv",
            "catalogue.csv",
            "--store",
            "store",
            "--workers",
            "1",
            "--no-progress",
            cwd=tmp_path,
            env=empty_cache,
        )

    result = run_both()
    assert result.returncode == 0, result.stderr
    assert "2 of 2 rows of uploads and 2 of 2 rows of catalogue matched" in result.stdout
    assert "weights unavailable" not in result.stderr
    assert "cuda" not in result.stderr.lower() and "absl" not in result.stderr  # a quiet terminal
    assert "Scheduler at" not in result.stderr and "Nanny" not in result.stderr  # nor Dask's INFO

    plain = imgsim("run", "uploads.csv", "catalogue.csv", "--store", "store", "--no-progress",
                   cwd=tmp_path, env=empty_cache)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == result.stdout.replace(  # the same result, without a cluster
        _seconds(result.stdout), _seconds(plain.stdout)
    )
    assert "dashboard:" not in plain.stderr and "dashboard:" in result.stderr

    (tmp_path / "uploads.csv").write_text(f"id,url\n0,{image_dir / 'rocket.jpg'}\n")
    assert_usage_error(
        run_both(),
        "uploads.csv, which has changed since (2 rows then, 1 now); pass --overwrite to start over",
    )


def _seconds(summary: str) -> str:
    """The run time in a match summary ('...; 0.1 s'), which differs between runs."""
    found = re.search(r"; [0-9.]+ s", summary)
    assert found, summary
    return found[0]
