#!/usr/bin/env bash
# Set up ./.venv if needed and run the offline demo on the embedded local Dask cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/imgsim demo "$@"
