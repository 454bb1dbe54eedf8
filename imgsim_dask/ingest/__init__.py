"""Ingest: check a CSV of image URLs on the driver, read it in byte blocks with Dask, and fix
every row's id in partitions aligned with the store's chunks, before any work starts.

`csvfile` checks the file and resolves its columns, `blocks` counts and parses its byte
blocks, `partitions` cuts the row range and assembles each partition's rows.
"""

from .blocks import read_blocks
from .csvfile import CsvFile, inspect_csv
from .partitions import Piece, assemble_partition, cut_partitions

__all__ = ["CsvFile", "Piece", "assemble_partition", "cut_partitions", "inspect_csv", "read_blocks"]
