"""Benchmark the matching engine against one dense numpy `A @ B.T`, in time and peak memory.

Random unit vectors plus planted near-duplicates (similarity ~0.9-0.99). Three runs on the
same data, each timed alone: the dense reference (`A @ B.T` in float32, then `np.nonzero`
at the threshold), `match_features` in-process (`client=None`, arrays in memory), and
`match_features` on a warm local cluster over the same rows imported into a Zarr store
(`imgsim import`): the `GPU` workers read B's slices from the store and keep them, spread
over `--gpu-workers` workers (each with `--memory-limit`), and A's blocks stream to them.
Peak memory is the peak RSS increase of the process doing the scoring, sampled every few
milliseconds (for the cluster run: the largest over the GPU workers), against the size of
the dense float32 matrix.

    python scripts/bench_match.py                       # 13501 x 21221 x 1024, with dense
    python scripts/bench_match.py --n 100000 --m 100000 --out bench-100k.json
    python scripts/bench_match.py --n 100000 --m 100000 --gpu-workers 4 --memory-limit 300MB
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from imgsim_dask.match import available_cpus, match_features
from imgsim_dask.options import SCORERS, MatchOptions

MiB = 2**20


class RssSampler:
    """Peak RSS of this process above its level at start, sampled on a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def increase(self) -> int:
        return self.peak - self.base


def _worker_sampler_start(dask_worker=None) -> int:
    sampler = RssSampler()
    sampler.__enter__()
    dask_worker._bench_rss_sampler = sampler
    return sampler.base


def _worker_sampler_stop(dask_worker=None) -> dict:
    sampler = dask_worker._bench_rss_sampler
    sampler.__exit__(None, None, None)
    return {"base": sampler.base, "peak": sampler.peak}


def make_data(
    n: int, m: int, dim: int, planted: int, seed: int
) -> tuple[np.ndarray, np.ndarray, set]:
    """Unit rows; `planted` rows of A are noisy copies of rows of B (similarity ~0.9-0.99)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, dim), dtype=np.float32)
    b = rng.standard_normal((m, dim), dtype=np.float32)
    for x in (a, b):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    count = min(planted, n, m)
    rows_a = rng.choice(n, size=count, replace=False)
    rows_b = rng.choice(m, size=count, replace=False)
    target = rng.uniform(0.9, 0.99, size=(count, 1)).astype(np.float32)
    noise = rng.standard_normal((count, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = target * b[rows_b] + np.sqrt(1 - target**2) * noise
    a[rows_a] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return a, b, set(zip(rows_a.tolist(), rows_b.tolist()))


def scoring_cluster(workers: int, memory_limit: str):
    """A local cluster of `workers` scoring workers (tagged GPU, 1 thread each)."""
    from distributed import Nanny, Scheduler, SpecCluster

    from imgsim_dask.cluster import GPU

    options = {"host": "127.0.0.1", "dashboard": False, "nthreads": 1,
               "resources": {GPU: 1}, "memory_limit": memory_limit}  # fmt: skip
    return SpecCluster(
        workers={f"score-{i}": {"cls": Nanny, "options": options} for i in range(workers)},
        scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}},
        silence_logs=logging.ERROR,
    )


def best_of(repeat: int, run) -> tuple[float, object, int]:
    """Fastest wall time of `repeat` runs, the last result, and the largest RSS increase."""
    seconds, result, increase = [], None, 0
    for _ in range(repeat):
        with RssSampler() as sampler:
            started = time.perf_counter()
            result = run()
            seconds.append(time.perf_counter() - started)
        increase = max(increase, sampler.increase)
    return min(seconds), result, increase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=13501, help="rows of A")
    parser.add_argument("--m", type=int, default=21221, help="rows of B")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--planted", type=int, default=500, help="near-duplicate pairs planted")
    parser.add_argument("--threshold", type=float, default=0.845)
    parser.add_argument("--block-rows", type=int, default=MatchOptions.block_rows)
    parser.add_argument("--slice-rows", type=int, default=MatchOptions.slice_rows)
    parser.add_argument(
        "--threads", type=int, default=None, help="kernel threads per task [default: all CPUs]"
    )
    parser.add_argument("--repeat", type=int, default=2, help="take the fastest of N runs")
    parser.add_argument(
        "--dense",
        choices=["auto", "yes", "no"],
        default="auto",
        help="run the dense reference (auto: when the matrix fits in 1/3 of RAM)",
    )
    parser.add_argument("--skip-local", action="store_true", help="skip the in-process run")
    parser.add_argument("--skip-cluster", action="store_true", help="skip the cluster run")
    parser.add_argument(
        "--scorer",
        default="numpy",
        choices=SCORERS,
        help="kernel of our runs (keras: Keras ops on the backend's device)",
    )
    parser.add_argument("--gpu-workers", type=int, default=1, help="scoring workers (cluster)")
    parser.add_argument(
        "--memory-limit", default="auto", help="each scoring worker's Dask memory limit"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    options = MatchOptions(
        threshold=args.threshold,
        block_rows=args.block_rows,
        slice_rows=args.slice_rows,
        threads=args.threads,
        scorer=args.scorer,
    )
    dense_bytes = args.n * args.m * 4
    run_dense = args.dense == "yes" or (
        args.dense == "auto" and dense_bytes < psutil.virtual_memory().total / 3
    )

    a, b, planted = make_data(args.n, args.m, args.dim, args.planted, args.seed)
    limit = np.float32(args.threshold)
    results: dict[str, dict] = {}
    pair_sets: dict[str, set] = {}

    if run_dense:

        def dense():
            sims = a @ b.T
            rows_a, rows_b = np.nonzero(sims >= limit)
            return rows_a, rows_b

        seconds, (rows_a, rows_b), increase = best_of(args.repeat, dense)
        pair_sets["dense"] = set(zip(rows_a.tolist(), rows_b.tolist()))
        results["dense"] = {
            "seconds": seconds,
            "peak_rss_increase": increase,
            "pairs": len(pair_sets["dense"]),
        }

    if not args.skip_local:
        match_features(a[:256], b[:1024], options, client=None)  # warm-up
        seconds, found, increase = best_of(
            args.repeat, lambda: match_features(a, b, options, client=None)
        )
        pair_sets["ours, in-process"] = set(zip(found["row_a"].tolist(), found["row_b"].tolist()))
        results["ours, in-process"] = {
            "seconds": seconds,
            "peak_rss_increase": increase,
            "pairs": len(found),
        }

    if not args.skip_cluster:
        from distributed import Client

        from imgsim_dask import import_features, open_source

        with tempfile.TemporaryDirectory(prefix="bench-match-") as tmp:
            store = Path(tmp) / "store"
            for name, x in (("a", a), ("b", b)):
                np.save(Path(tmp) / f"{name}.npy", x)
                import_features(name, Path(tmp) / f"{name}.npy", store, threshold=args.threshold)
            stored_a = open_source(store, "a").on_workers
            stored_b = open_source(store, "b").on_workers
            with (
                scoring_cluster(args.gpu_workers, args.memory_limit) as cluster,
                Client(cluster) as client,
            ):
                client.wait_for_workers(args.gpu_workers, timeout=120)
                model = list(client.scheduler_info()["workers"])
                match_features(a[:256], b[:1024], options, client=client)  # warm-up
                times, increases, driver_increases = [], [], []
                for _ in range(args.repeat):
                    client.run(_worker_sampler_start, workers=model)
                    with RssSampler() as driver:
                        started = time.perf_counter()
                        found = match_features(stored_a, stored_b, options, client=client)
                        times.append(time.perf_counter() - started)
                    peaks = client.run(_worker_sampler_stop, workers=model).values()
                    increases.append(max(w["peak"] - w["base"] for w in peaks))
                    driver_increases.append(driver.increase)
        pair_sets["ours, cluster"] = set(zip(found["row_a"].tolist(), found["row_b"].tolist()))
        results["ours, cluster"] = {
            "seconds": min(times),
            "peak_rss_increase": max(increases),
            "driver_peak_rss_increase": max(driver_increases),
            "pairs": len(found),
        }

    reference = pair_sets.get("dense")
    first = next(iter(pair_sets.values()))
    for name, row in results.items():
        row["same_pairs_as_dense"] = None if reference is None else pair_sets[name] == reference
        row["same_pairs_as_first"] = pair_sets[name] == first
        row["planted_found"] = len(planted & pair_sets[name])
        row["peak_rss_increase_vs_dense_matrix"] = row["peak_rss_increase"] / dense_bytes
        if "dense" in results:
            row["time_vs_dense"] = row["seconds"] / results["dense"]["seconds"]

    print(
        f"A {args.n} x {args.dim}, B {args.m} x {args.dim}, threshold {args.threshold}, "
        f"{len(planted)} planted pairs; dense float32 matrix {dense_bytes / MiB:,.0f} MiB; "
        f"block_rows {options.block_rows}, slice_rows {options.slice_rows}, "
        f"threads {options.threads or available_cpus()}, scorer {args.scorer}; "
        f"best of {args.repeat}"
    )
    print(
        f"{'run':<18}{'seconds':>9}{'x dense':>9}{'peak RSS +MiB':>15}{'% dense':>9}"
        f"{'pairs':>9}{'planted':>9}{'= dense':>9}"
    )
    for name, row in results.items():
        ratio = f"{row['time_vs_dense']:.3f}" if "time_vs_dense" in row else "-"
        same = {None: "-", True: "yes", False: "NO"}[row["same_pairs_as_dense"]]
        print(
            f"{name:<18}{row['seconds']:>9.2f}{ratio:>9}"
            f"{row['peak_rss_increase'] / MiB:>15.0f}"
            f"{100 * row['peak_rss_increase_vs_dense_matrix']:>8.1f}%"
            f"{row['pairs']:>9}{row['planted_found']:>9}{same:>9}"
        )
    if "ours, cluster" in results:
        print(
            f"(cluster: driver process peak RSS +"
            f"{results['ours, cluster']['driver_peak_rss_increase'] / MiB:.0f} MiB)"
        )

    if args.out:
        report = {
            "args": vars(args),
            "dense_matrix_bytes": dense_bytes,
            "options": {
                "block_rows": options.block_rows,
                "slice_rows": options.slice_rows,
                "threads": options.threads or available_cpus(),
            },
            "machine": {
                "cpus": available_cpus(),
                "processor": platform.processor(),
                "ram_bytes": psutil.virtual_memory().total,
            },
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
