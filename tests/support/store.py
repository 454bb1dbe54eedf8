"""Stored sources made without extracting: features as given, through the real StoreWriter."""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgsim_dask.store import StoreWriter


def make_source(store, name, features, model="mobilenet", ids=None, extra=None,
                weights=("file test", "x")):
    """A complete source written through the real StoreWriter (features as given); `extra`
    adds fields (name -> one value per row) after `id` and `url`; `weights` is the
    (description, sha256) its meta records."""
    extra = extra or {}
    n, dim = features.shape
    writer = StoreWriter(store, name, {"rows": n, "dim": dim, "partition_rows": 4})
    ids = ids or [f"{name}-{i}" for i in range(n)]
    for k, start in enumerate(range(0, n, 4)):
        stop = min(n, start + 4)
        status = ["ok" if not np.isnan(features[i]).any() else "not_found"
                  for i in range(start, stop)]
        rows = pd.DataFrame({"row": range(start, stop), "id": ids[start:stop],
                             "url": [f"http://127.0.0.1/{name}/{i}.jpg"
                                     for i in range(start, stop)],
                             **{f: v[start:stop] for f, v in extra.items()}, "status": status})
        writer.write_partition(k, features[start:stop], rows)
    return writer.finish({"name": name, "model": model, "dim": dim, "threshold": 0.845,
                          "weights": weights[0], "weights_sha256": weights[1],
                          "fields": ["id", "url", *extra],
                          "rows": n})
