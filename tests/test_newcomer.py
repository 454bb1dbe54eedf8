"""A new user's first hour, scripted: the README's Quick start commands exactly as written
and its Python snippet saved as a script, on CSVs of the user's own (other column names),
served over HTTP from 127.0.0.1. The one change is the one the README offers for a machine
without internet: `--model efficientnet-lite0` (`MODEL = "efficientnet-lite0"`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from imgsim_dask.models import get_spec

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

README = Path(__file__).resolve().parents[1] / "README.md"
OFFLINE_MODEL = "efficientnet-lite0"


def quick_start() -> tuple[list[str], str]:
    """The Quick start's shell commands (no setup line, no comments) and its Python snippet."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    shell, python = re.findall(r"```(?:bash|python)\n(.*?)```", section, re.S)[:2]
    commands = []
    for line in shell.splitlines():
        command = line.split("  #", 1)[0].strip()
        if command and not command.startswith(("#", "scripts/setup.sh")):
            commands.append(command)
    return commands, python


def write_csvs(directory: Path, base_url: str) -> None:
    """The user's own CSVs: `sku,name,url` and `id,image_url,title` (URL not last)."""
    pd.DataFrame(
        {
            "sku": ["p1", "p2", "p3", "p4"],
            "name": ["cat", "coffee", "rocket", "astronaut"],
            "url": [f"{base_url}/{n}.jpg" for n in ("chelsea", "coffee", "rocket", "astronaut")],
        }
    ).to_csv(directory / "products.csv", index=False)
    pd.DataFrame(
        {
            "id": ["u1", "u2", "u3"],
            "image_url": [
                f"{base_url}/{f}" for f in ("chelsea_small.png", "camera.jpg", "gone.jpg")
            ],
            "title": ["my cat, smaller", "a camera", "a broken link"],
        }
    ).to_csv(directory / "uploads.csv", index=False)


def user_env(tmp_path: Path) -> dict[str, str]:
    """The installed `imgsim` on PATH, and an empty Keras cache (no MobileNet weights)."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KERAS_HOME": str(tmp_path / "empty-keras-cache"),
    }


def test_the_quick_start_as_written(tmp_path, image_server):
    commands, _ = quick_start()
    assert len(commands) >= 8 and commands[0].startswith("imgsim extract products.csv")
    write_csvs(tmp_path, image_server.base_url)
    env = user_env(tmp_path)
    for command in commands:
        if command.startswith("imgsim extract"):
            command += f" --model {OFFLINE_MODEL}"  # as the README says, offline
        done = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        assert "Traceback" not in done.stderr, command
        verb = command.split()[1]
        if verb in ("match", "dedupe", "run"):  # each says what rule kept its pairs
            assert re.search(
                r"kept pairs with similarity >= [-\d.]+ \((given|the default of "
                f"{OFFLINE_MODEL}, rmac-trim)\\)",
                done.stdout,
            ), f"{command}\n{done.stdout}"
        if verb == "failures":
            assert "u3" in done.stdout and "http_404" in done.stdout
        if verb == "ls":
            assert "uploads" in done.stdout and "products" in done.stdout
    assert (tmp_path / "matches.parquet").is_file() and (tmp_path / "best.csv").is_file()
    assert (tmp_path / "products_feature.h5").is_file()
    best = pd.read_csv(tmp_path / "best.csv")
    assert dict(zip(best["uploads_id"], best["products_sku"])) == {"u1": "p1"}


def test_the_python_snippet_as_a_script(tmp_path, image_server):
    _, snippet = quick_start()
    assert 'MODEL = "mobilenet"' in snippet and '__name__ == "__main__"' in snippet
    write_csvs(tmp_path, image_server.base_url)
    script = tmp_path / "match.py"
    script.write_text(snippet.replace('MODEL = "mobilenet"', f'MODEL = "{OFFLINE_MODEL}"'))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=user_env(tmp_path),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    threshold = get_spec(OFFLINE_MODEL).threshold
    assert (
        f"kept pairs with similarity >= {threshold:g} (the default of {OFFLINE_MODEL}, "
        "rmac-trim)" in done.stdout
    )
    assert re.search(r"\d of 2 rows of uploads and \d of 4 rows of products matched", done.stdout)
    assert "/chelsea.jpg" in done.stdout  # the smaller cat found its original
