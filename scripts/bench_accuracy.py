"""Match quality on a near-duplicate set built offline: AP, best F1, precision and recall.

    python scripts/bench_accuracy.py [--seed 0] [--per-edit 2] [--out bench-results/accuracy.json]
    python scripts/bench_accuracy.py --tool     # also through `imgsim extract/match/dedupe`

The set (`build_set`): the photographs that install with scikit-image and scikit-learn,
`--per-edit` copies of each under every edit of `imgsim_dask.calibrate.edits` (parameters
drawn from `--seed`) plus two-edit combinations, and hard negatives: regions of each photo
blown up, and faces of different people from scikit-image's LFW subset.

Two tasks are scored, every pair of each:
- **match**: every copy and negative against the originals (a copy matches its original);
- **dedupe**: every image against every other (a pair is a match when both come from
  one photograph; a blown-up region is a match of nothing).

Descriptors are compared on the same decoded pixels, one model pass each (the model's last
feature map, pooled here as the descriptor would pool it). `--tool` runs the default
descriptor end to end instead: `imgsim extract` on the local cluster, `match`, `dedupe`,
scored from their pairs tables. The imagehash pHash baseline is scored the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# --- scoring ---------------------------------------------------------------------------------


def pair_labels(table: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows a, rows b, is-a-match) of every pair the task scores."""
    groups = table["group"].to_numpy()
    if task == "match":
        a = np.flatnonzero(table["kind"].to_numpy() != "original")
        b = np.flatnonzero(table["kind"].to_numpy() == "original")
        ia, ib = np.repeat(a, len(b)), np.tile(b, len(a))
    else:
        ia, ib = np.triu_indices(len(table), 1)
    return ia, ib, groups[ia] == groups[ib]


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = truth[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / max(1, hits.sum()))


def best_f1(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The best F1 over thresholds, and the threshold (midway to the next score) giving it."""
    order = np.argsort(-scores, kind="stable")
    hits, ranked = truth[order], scores[order]
    tp = np.cumsum(hits)
    f1 = 2 * tp / (np.arange(1, len(hits) + 1) + hits.sum())
    i = int(np.argmax(f1))
    below = ranked[i + 1] if i + 1 < len(ranked) else ranked[i] - 1e-3
    return float(f1[i]), float((ranked[i] + below) / 2)


def at_threshold(scores: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    kept = scores >= threshold
    tp = int((kept & truth).sum())
    return {
        "threshold": round(float(threshold), 4),
        "precision": tp / max(1, int(kept.sum())),
        "recall": tp / max(1, int(truth.sum())),
        "pairs": int(kept.sum()),
    }


def threshold_for_precision(scores: np.ndarray, truth: np.ndarray, target: float) -> float:
    """The lowest threshold (a score) whose pairs at or above it have `target` precision."""
    order = np.argsort(-scores, kind="stable")
    hits, ranked = truth[order], scores[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    ok = np.flatnonzero(precision >= target)
    return float(ranked[ok[-1]]) if len(ok) else float(ranked[0])


def report(table: pd.DataFrame, similarity: np.ndarray, threshold: float | None) -> dict:
    """Both tasks' figures from a full similarity matrix; `threshold`: the one in use (None:
    the one reaching precision 0.95 on the dedupe task)."""
    out: dict = {}
    for task in ("match", "dedupe"):
        ia, ib, truth = pair_labels(table, task)
        scores = similarity[ia, ib]
        f1, f1_at = best_f1(scores, truth)
        out[task] = {"ap": average_precision(scores, truth), "best_f1": f1, "best_f1_at": f1_at,
                     "p95_at": threshold_for_precision(scores, truth, 0.95)}  # fmt: skip
    chosen = out["dedupe"]["p95_at"] if threshold is None else threshold
    for task in ("match", "dedupe"):
        ia, ib, truth = pair_labels(table, task)
        out[task]["at"] = at_threshold(similarity[ia, ib], truth, chosen)
        out[task]["sweep"] = [
            at_threshold(similarity[ia, ib], truth, t) for t in np.arange(0.55, 0.755, 0.01)
        ]  # (what a threshold of its own would give, for choosing one)
    out["per_edit"] = per_edit(table, similarity)
    out["negatives"] = top_negatives(table, similarity)
    return out


def per_edit(table: pd.DataFrame, similarity: np.ndarray) -> dict[str, dict[str, float]]:
    """Minimum and median similarity of each edit's copies to their original."""
    original = {g: i for i, g in table.loc[table["kind"] == "original", "group"].items()}
    copies = table[table["kind"] == "copy"]
    values = pd.Series(
        [similarity[i, original[g]] for i, g in copies["group"].items()], index=copies.index
    )
    edit = copies["edit"].where(~copies["edit"].str.contains("+", regex=False), "two edits")
    return {
        name: {"min": float(v.min()), "median": float(v.median()), "n": len(v)}
        for name, v in values.groupby(edit)
    }


def top_negatives(table: pd.DataFrame, similarity: np.ndarray, count: int = 5) -> list[dict]:
    ia, ib, truth = pair_labels(table, "dedupe")
    scores = np.where(truth, -np.inf, similarity[ia, ib])
    best = np.argsort(-scores)[:count]
    name = (table["group"] + "/" + table["edit"]).to_numpy()
    return [{"a": name[ia[k]], "b": name[ib[k]], "similarity": float(scores[k])} for k in best]


# --- descriptors ------------------------------------------------------------------------------


def decoded(files: list[str], size: int, trim: bool) -> np.ndarray:
    from imgsim_dask.decode import decode_image

    return np.stack([decode_image(Path(f).read_bytes(), size, trim_borders=trim)[0] for f in files])


def feature_maps(model_name: str, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """The model's last feature map (before pooling) for uint8 pixels, via imgsim's runtime;
    the model is built for the pixels' size."""
    import keras

    from imgsim_dask.models import build_model, resolve_weights
    from imgsim_dask.runtime import make_predictor

    weights, size = resolve_weights(model_name, None), pixels.shape[1]
    model = build_model(weights, tempfile.gettempdir(), "avg", size)
    trunk = keras.Model(model.input, model.layers[-1].input)
    predictor = make_predictor(trunk)
    out = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        padded = np.zeros((batch, *chunk.shape[1:]), predictor.input_dtype)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(predictor(padded))[: len(chunk)])
    return np.concatenate(out)


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def descriptors(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every descriptor option measured, as L2-normalised row vectors: imgsim's descriptors
    (`--descriptor`) by name, and the options measured but not adopted."""
    from imgsim_dask.descriptor import gem_pool, regional_gem

    plain, trimmed, flipped = maps["plain"], maps["trim"], maps["trim-flip"]
    out = {
        "avg": normalised(plain.mean(axis=(1, 2))),
        "max (not adopted)": normalised(plain.max(axis=(1, 2))),
        "gem": normalised(gem_pool(plain, 3.0)),
        "rmac": normalised(regional_gem(plain)),
        "trim + avg (not adopted)": normalised(trimmed.mean(axis=(1, 2))),
        "trim + gem (not adopted)": normalised(gem_pool(trimmed, 3.0)),
        "rmac-trim": normalised(regional_gem(trimmed)),
        "rmac-trim + flip (not adopted)": normalised(regional_gem(trimmed) + regional_gem(flipped)),
    }
    centred = out["rmac-trim"] - out["rmac-trim"].mean(axis=0)
    out["rmac-trim + centring (not adopted)"] = normalised(centred)
    return out


def phash_similarity(files: list[str]) -> np.ndarray:
    """1 - Hamming distance / 64 between imagehash pHashes: the perceptual-hash baseline."""
    import imagehash

    bits = np.stack([imagehash.phash(Image.open(f)).hash.reshape(-1) for f in files]).astype(
        np.float32
    )
    agree = bits @ bits.T + (1 - bits) @ (1 - bits).T
    return agree / bits.shape[1]


# --- the tool, end to end ----------------------------------------------------------------------


def through_the_tool(table: pd.DataFrame, work: Path, model: str, image_size: int) -> dict:
    """`imgsim extract` + `match` + `dedupe` with the defaults (but the input size), scored
    from their pairs."""
    from imgsim_dask import extract, match_sources

    store = work / "store"
    originals_csv, others_csv, all_csv = (
        work / "originals.csv",
        work / "others.csv",
        work / "all.csv",
    )
    is_original = table["kind"] == "original"
    table[is_original][["file"]].to_csv(originals_csv, index=False)
    table[~is_original][["file"]].to_csv(others_csv, index=False)
    table[["file"]].to_csv(all_csv, index=False)
    out: dict = {}
    started = time.perf_counter()
    for csv, name in ((originals_csv, "originals"), (others_csv, "others"), (all_csv, "all")):
        source = extract(
            str(csv), name, str(store), url_col="file", model=model, image_size=image_size,
            overwrite=True,
        )  # fmt: skip
        assert source.status_counts() == {"ok": source.meta.rows}, source.status_counts()
    out["extract_seconds"] = time.perf_counter() - started
    a_rows, b_rows = np.flatnonzero(~is_original), np.flatnonzero(is_original)
    groups = table["group"].to_numpy()

    matched = match_sources("others", "originals", str(store))
    truth = pair_labels(table, "match")[2].sum()
    found = groups[a_rows[matched.pairs["row_a"]]] == groups[b_rows[matched.pairs["row_b"]]]
    out["match"] = _precision_recall(found, truth, matched.threshold)

    deduped = match_sources("all", "all", str(store))
    truth = pair_labels(table, "dedupe")[2].sum()
    found = groups[deduped.pairs["row_a"]] == groups[deduped.pairs["row_b"]]
    out["dedupe"] = _precision_recall(found, truth, deduped.threshold)
    out["seed_demo"] = seed_demo_pairs(store, model, image_size)

    from imgsim_dask.calibrate import calibrate
    from imgsim_dask.store import open_source

    started = time.perf_counter()
    calibration = calibrate("all", str(store), sample=200)
    features = open_source(str(store), "all").features[:]
    similarity = features @ features.T
    out["calibrate"] = {
        "seconds": time.perf_counter() - started,
        "recommended": calibration.threshold,
        "estimated": {"precision": calibration.precision, "recall": calibration.recall,
                      "positives": calibration.positives},
        **{task: at_threshold(similarity[ia, ib], truth, calibration.threshold)
           for task in ("match", "dedupe")
           for ia, ib, truth in [pair_labels(table, task)]},
    }  # fmt: skip
    out["features"] = features
    return out


SEED_DEMO = Path(__file__).resolve().parents[2] / "shared" / "seed" / "demo"


def seed_demo_pairs(store: Path, model: str, image_size: int) -> dict | None:
    """The original's six demo covers self-matched at the default threshold: the pairs found
    and the same-cover pairs of its truth.csv (None where the seed is not beside the repo)."""
    from imgsim_dask import extract, match_sources

    if not (SEED_DEMO / "truth.csv").is_file():
        return None
    truth = pd.read_csv(SEED_DEMO / "truth.csv")
    same = sorted((int(a), int(b)) for a, b in truth.loc[truth["same"] == "yes", ["a", "b"]].values)
    csv = store.parent / "seed.csv"
    files = sorted(SEED_DEMO.glob("*.jpg"), key=lambda p: int(p.stem))
    pd.DataFrame({"file": [str(f) for f in files]}).to_csv(csv, index=False)
    extract(
        str(csv), "seed", str(store), url_col="file", model=model, image_size=image_size,
        overwrite=True,
    )  # fmt: skip
    found = match_sources("seed", "seed", str(store)).pairs
    pairs = sorted((int(a) + 1, int(b) + 1) for a, b in found[["row_a", "row_b"]].values)
    similarity = [round(float(v), 3) for v in found["similarity"]]
    return {"truth": same, "found": pairs, "similarity": similarity, "exact": pairs == same}


def _precision_recall(found: np.ndarray, truth: int, threshold: float) -> dict:
    return {"threshold": threshold, "pairs": len(found),
            "precision": float(found.mean()) if len(found) else 1.0,
            "recall": float(found.sum() / truth)}  # fmt: skip


# --- the report ----------------------------------------------------------------------------------


def table_rows(results: dict[str, dict]) -> list[str]:
    lines = [
        "| descriptor | match AP | match best F1 (at) | dedupe AP | dedupe best F1 (at) "
        "| threshold | match P / R | dedupe P / R |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        m, d = r["match"], r["dedupe"]
        lines.append(
            f"| {name} | {m['ap']:.3f} | {m['best_f1']:.3f} ({m['best_f1_at']:.2f}) "
            f"| {d['ap']:.3f} | {d['best_f1']:.3f} ({d['best_f1_at']:.2f}) "
            f"| {d['at']['threshold']:.3f} "
            f"| {m['at']['precision']:.3f} / {m['at']['recall']:.3f} "
            f"| {d['at']['precision']:.3f} / {d['at']['recall']:.3f} |"
        )
    return lines


def require_whole_set() -> None:
    """Stop unless scikit-learn is installed: without its two photos, `build_set` makes a
    smaller set whose figures do not compare with the documented ones."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the benchmark set needs scikit-learn's sample photos: pip install -e '.[bench]'"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-edit", type=int, default=2)
    parser.add_argument("--combos", type=int, default=4)
    parser.add_argument("--tool", action="store_true", help="also run imgsim end to end")
    parser.add_argument(
        "--image-size", type=int, help="decode to this many pixels a side (default: the model's)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/accuracy.json"))
    args = parser.parse_args()
    require_whole_set()

    from imgsim_dask.calibrate.benchmark import build_set
    from imgsim_dask.models import get_spec

    work = Path(tempfile.mkdtemp(prefix="imgsim-accuracy-"))
    table = build_set(work / "images", args.seed, args.per_edit, args.combos)
    counts = table["kind"].value_counts().to_dict()
    print(f"set: {len(table)} images ({counts}), seed {args.seed}, in {work}")
    files = table["file"].tolist()
    size = args.image_size or get_spec(args.model).image_size

    started = time.perf_counter()
    trimmed = decoded(files, size, trim=True)
    maps = {
        "plain": feature_maps(args.model, decoded(files, size, trim=False)),
        "trim": feature_maps(args.model, trimmed),
        "trim-flip": feature_maps(args.model, trimmed[:, :, ::-1]),
    }
    print(f"feature maps: {time.perf_counter() - started:.1f} s")
    spec = get_spec(args.model)
    results: dict[str, dict] = {}
    for name, features in descriptors(maps).items():
        results[name] = report(table, features @ features.T, spec.threshold_for(name, size))
    results["pHash (imagehash)"] = report(table, phash_similarity(files), None)
    if args.tool:
        tool = through_the_tool(table, work, args.model, size)
        features = tool.pop("features")
        results[f"imgsim extract ({spec.default_descriptor})"] = report(
            table, features @ features.T, spec.threshold_for(spec.default_descriptor, size)
        )
        results["imgsim (tool)"] = tool

    print("\n".join(table_rows({k: v for k, v in results.items() if "ap" in v.get("match", {})})))
    for name in ("avg", spec.default_descriptor, "pHash (imagehash)"):
        print(f"\n{name}: per edit (min / median similarity to the original)")
        for edit, v in results[name]["per_edit"].items():
            print(f"  {edit:12s} {v['min']:.3f} / {v['median']:.3f}  (n={v['n']})")
        print("  highest negatives:", *(f"{n['a']} ~ {n['b']}: {n['similarity']:.3f}"
                                       for n in results[name]["negatives"]), sep="\n    ")  # fmt: skip
    if args.tool:
        print("\nimgsim end to end:", json.dumps(results["imgsim (tool)"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv), "set": counts, "results": results,
    }, indent=1))  # fmt: skip
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
