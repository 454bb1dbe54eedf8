"""Groups: the connected components of a self match's pairs (a near-duplicate group each),
computed at once (`connected_groups`) or from pairs fed in pieces (`GroupForest`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

FOREST_BATCH = 1 << 22  # pairs a GroupForest takes in before it reduces them (64 MiB of ids)


def connected_groups(rows_a: np.ndarray, rows_b: np.ndarray, n: int) -> np.ndarray:
    """Group id per row of a self match: the smallest row id of its connected component.

    Rows that matched nothing are their own group.
    """
    rows_a = np.asarray(rows_a, dtype=np.int64)
    rows_b = np.asarray(rows_b, dtype=np.int64)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    return _smallest_in_component(rows_a, rows_b, n)


def _smallest_in_component(rows_a: np.ndarray, rows_b: np.ndarray, n: int) -> np.ndarray:
    """For each of `n` vertices, the smallest vertex of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # int32 weights: duplicate edges are summed, and an int8 sum could wrap round to 0
    graph = coo_matrix((np.ones(len(rows_a), np.int32), (rows_a, rows_b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # first vertex of a label = its smallest
    return first[labels].astype(np.int64)


class GroupForest:
    """The connected components of pairs added in pieces, held as a spanning forest: an edge
    from each component's smallest row to each of its other rows, and the rows paired only
    with themselves. It holds the rows in any pair, plus the pairs added since it last
    reduced (at most `batch`, or as many as the forest has edges), never all the pairs."""

    def __init__(self, batch: int = FOREST_BATCH):
        self.batch = batch
        self._roots = np.empty(0, np.int64)  # edge i: _roots[i] -- _rows[i]
        self._rows = np.empty(0, np.int64)
        self._alone = np.empty(0, np.int64)  # rows paired only with themselves
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_pairs = 0

    def add(self, rows_a: np.ndarray, rows_b: np.ndarray) -> None:
        """Take in pairs (row_a[i], row_b[i])."""
        self._pending.append((np.asarray(rows_a, np.int64), np.asarray(rows_b, np.int64)))
        self._pending_pairs += len(rows_a)
        if self._pending_pairs > max(self.batch, len(self._rows)):
            self._reduce()

    def _reduce(self) -> None:
        """The spanning forest of the forest and the pending pairs together."""
        a = np.concatenate([self._roots, self._alone, *(p[0] for p in self._pending)])
        b = np.concatenate([self._rows, self._alone, *(p[1] for p in self._pending)])
        self._pending, self._pending_pairs = [], 0
        members, vertex = np.unique(np.concatenate([a, b]), return_inverse=True)
        roots = members[_smallest_in_component(vertex[: len(a)], vertex[len(a) :], len(members))]
        leaf = roots != members
        self._roots, self._rows = roots[leaf], members[leaf]
        self._alone = members[~leaf & ~np.isin(members, self._roots)]

    def groups(self) -> pd.Series:
        """The group (the smallest row of its component) of every row in a pair, by row."""
        self._reduce()
        members = np.union1d(np.union1d(self._roots, self._rows), self._alone)
        group = members.copy()
        group[np.searchsorted(members, self._rows)] = self._roots
        return pd.Series(group, index=pd.Index(members, name="row"), name="group")
