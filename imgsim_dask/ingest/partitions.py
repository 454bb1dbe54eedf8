"""Partitions: cut the global row range into fixed-size partitions, aligned with the feature
store's chunks whatever the CSV's block boundaries, and assemble each from its block slices."""

from __future__ import annotations

import pandas as pd

from ..schema import INGEST_ERROR, ROW

Piece = tuple[int, int, int]  # (block index, start row in block, stop row in block)


def cut_partitions(
    block_lengths: list[int], partition_rows: int, first_row: int = 0
) -> list[list[Piece]]:
    """Cut the concatenated blocks into partitions of `partition_rows` rows (the last may be short).

    Partition k holds global rows [k * partition_rows, (k + 1) * partition_rows); the blocks'
    rows are numbered from `first_row` (an append's), so the first partition may be short.
    """
    partitions: list[list[Piece]] = []
    current: list[Piece] = []
    room = partition_rows - first_row % partition_rows
    for block, length in enumerate(block_lengths):
        start = 0
        while start < length:
            take = min(room, length - start)
            current.append((block, start, start + take))
            start += take
            room -= take
            if room == 0:
                partitions.append(current)
                current, room = [], partition_rows
    if current:
        partitions.append(current)
    return partitions


def assemble_partition(
    first_row: int,
    slices: list[tuple[pd.DataFrame, int, int]],
    columns: list[str],
    only_rows: list[int] | None = None,
) -> pd.DataFrame:
    """Concatenate block slices into one partition of `columns` (plus `INGEST_ERROR`, if the
    blocks have it), rows numbered from `first_row`; with `only_rows`, just those row ids."""
    columns = [*columns, INGEST_ERROR] if INGEST_ERROR in slices[0][0] else columns
    parts = [frame.iloc[start:stop][columns] for frame, start, stop in slices]
    rows = (
        pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    )
    rows.insert(0, ROW, range(first_row, first_row + len(rows)))
    if only_rows is not None:
        rows = rows[rows[ROW].isin(only_rows)].reset_index(drop=True)
    return rows
