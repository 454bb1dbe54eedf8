"""`python -m imgsim_dask` runs the CLI."""

from .cli import main

main()
