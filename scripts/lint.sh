#!/usr/bin/env bash
# Set up ./.venv if needed, then lint (ruff: rules, import order, formatting) and type-check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check imgsim_dask tests scripts deploy
.venv/bin/ruff format --check imgsim_dask tests scripts deploy
.venv/bin/mypy
