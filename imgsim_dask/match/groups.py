"""Groups: the connected components of a self match's pairs (a near-duplicate group each)."""

from __future__ import annotations

import numpy as np


def connected_groups(rows_a: np.ndarray, rows_b: np.ndarray, n: int) -> np.ndarray:
    """Group id per row of a self match: the smallest row id of its connected component.

    Rows that matched nothing are their own group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows_a = np.asarray(rows_a, dtype=np.int64)
    rows_b = np.asarray(rows_b, dtype=np.int64)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows_a), dtype=np.int8), (rows_a, rows_b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # first row of a label = its smallest
    return first[labels].astype(np.int64)
