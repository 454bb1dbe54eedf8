"""Match: score the feature rows of A against those of B and keep only the pairs that matter.

`kernel` scores one block of A against B's slices inside a task (on the CPU, or through
`device` on an accelerator), `engine` runs it over all of A and B in-process or on the
cluster, `groups` turns a self match's pairs into near-duplicate groups.
"""

from .engine import check_shapes, estimate_pairs, match_features, pairs_frame
from .groups import GroupForest, connected_groups
from .kernel import available_cpus, score_block, valid_rows

__all__ = [
    "GroupForest",
    "available_cpus",
    "check_shapes",
    "connected_groups",
    "estimate_pairs",
    "match_features",
    "pairs_frame",
    "score_block",
    "valid_rows",
]
