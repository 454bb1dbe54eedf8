"""Similarities that justify a model's threshold, on two small real sets (README, "Models").

    python scripts/measure_thresholds.py [--model efficientnet-lite0] [--seed-demo DIR]

1. The original's demo photos (`--seed-demo`, with its truth.csv of same-cover pairs):
   the range of same-cover similarities and the best different-cover one.
2. `imgsim demo`'s sets, from local files: each edited upload against its catalogue
   original (the worst of them) and the best pair that is not a copy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


def extract_paths(client, paths: list[Path], name: str, store: Path, model: str) -> np.ndarray:
    from imgsim_dask import extract

    csv = store / f"{name}.csv"
    pd.DataFrame({"url": [str(p) for p in paths]}).to_csv(csv, index=False)
    source = extract(str(csv), name, str(store), cluster=client, model=model, overwrite=True)
    assert source.status_counts() == {"ok": len(paths)}, source.status_counts()
    return source.features[:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument(
        "--seed-demo",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "seed" / "demo",
    )
    args = parser.parse_args()

    from distributed import Client

    from imgsim_dask.cluster import local_cluster
    from imgsim_dask.demo import build_images

    work = Path(tempfile.mkdtemp(prefix="imgsim-thresholds-"))
    with (
        local_cluster(fetch_workers=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        if (args.seed_demo / "truth.csv").is_file():
            truth = pd.read_csv(args.seed_demo / "truth.csv")
            same = {(a - 1, b - 1) for a, b in truth.loc[truth["same"] == "yes", ["a", "b"]].values}
            paths = sorted(args.seed_demo.glob("*.jpg"), key=lambda p: int(p.stem))
            similarity = (lambda f: f @ f.T)(extract_paths(client, paths, "seed", work, args.model))
            pairs = [(i, j) for i in range(len(paths)) for j in range(i + 1, len(paths))]
            same_values = [similarity[p] for p in pairs if p in same]
            print(
                f"seed covers: same-cover {min(same_values):.3f}-{max(same_values):.3f}, "
                f"different covers at most {max(similarity[p] for p in pairs if p not in same):.3f}"
            )
        else:
            print(f"seed covers: skipped, no truth.csv in {args.seed_demo}")

        catalogue, uploads = build_images(work / "images")
        cat = extract_paths(
            client, [work / "images" / f for f in catalogue["file"]], "catalogue", work, args.model
        )
        up = extract_paths(
            client, [work / "images" / f for f in uploads["file"]], "uploads", work, args.model
        )
        similarity = up @ cat.T
        titles = catalogue["title"].tolist()
        copy_of = [titles.index(t.split(" (")[0]) if " (" in t else None for t in uploads["title"]]
        copies = [similarity[i, j] for i, j in enumerate(copy_of) if j is not None]
        mask = np.ones_like(similarity, bool)
        for i, j in enumerate(copy_of):
            if j is not None:
                mask[i, j] = False
        print(
            f"demo: {len(copies)} edited copies at >= {min(copies):.3f}; "
            f"best pair that is not a copy {similarity[mask].max():.3f}"
        )


if __name__ == "__main__":
    main()
