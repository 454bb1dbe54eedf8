"""Stored sources made without extracting: features as given, through the real SourceWriter."""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgsim_dask.schema import SourceMeta, SourcePlan
from imgsim_dask.store import SourceWriter


def plan_for(
    rows: int, dim: int, partition_rows: int = 4, fields=("id", "url"), model: str = "mobilenet"
) -> SourcePlan:
    """The plan of a source of `rows` x `dim` features (the other fields are placeholders)."""
    return SourcePlan(
        csv="test.csv",
        rows=rows,
        dim=dim,
        partition_rows=partition_rows,
        model=model,
        weights="test",
        fetch={},
        fields=list(fields),
        url_col="url",
        id_col="id",
        delimiter=",",
        header=True,
    )


def meta_for(
    plan: SourcePlan,
    name: str,
    status_counts: dict[str, int],
    weights: tuple[str, str] = ("file test", "x"),
) -> SourceMeta:
    """The meta.json of a source made from `plan`; `weights`: (description, sha256)."""
    return SourceMeta(
        name=name,
        model=plan.model,
        dim=plan.dim,
        threshold=0.845,
        weights=weights[0],
        weights_sha256=weights[1],
        csv=plan.csv,
        fields=plan.fields,
        url_col=plan.url_col,
        id_col=plan.id_col,
        rows=plan.rows,
        status_counts=status_counts,
        partition_rows=plan.partition_rows,
        batch_size=8,
        runtime=["openvino"],
        seconds=1.0,
        images_per_second=1.0,
        created="2026-12-01T00:00:00+00:00",
        versions={},
    )


def make_source(
    store, name, features, model="mobilenet", ids=None, extra=None, weights=("file test", "x")
):
    """A complete source written through the real SourceWriter (features as given); `extra`
    adds fields (name -> one value per row) after `id` and `url`; `weights` is the
    (description, sha256) its meta records."""
    extra = extra or {}
    n, dim = features.shape
    plan = plan_for(n, dim, fields=("id", "url", *extra), model=model)
    writer = SourceWriter(store, name, plan)
    ids = ids or [f"{name}-{i}" for i in range(n)]
    statuses = []
    for k, start in enumerate(range(0, n, 4)):
        stop = min(n, start + 4)
        status = [
            "ok" if not np.isnan(features[i]).any() else "not_found" for i in range(start, stop)
        ]
        statuses += status
        rows = pd.DataFrame(
            {
                "row": range(start, stop),
                "id": ids[start:stop],
                "url": [f"http://127.0.0.1/{name}/{i}.jpg" for i in range(start, stop)],
                **{f: v[start:stop] for f, v in extra.items()},
                "status": status,
            }
        )
        writer.write_partition(k, features[start:stop], rows)
    counts = pd.Series(statuses, dtype=str).value_counts()
    return writer.finish(meta_for(plan, name, {str(k): int(v) for k, v in counts.items()}, weights))
