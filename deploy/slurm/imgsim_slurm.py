"""imgsim on SLURM with dask-jobqueue: GPU model workers and CPU fetch workers as batch jobs,
over TLS.

This script is the driver: run it where jobs can be submitted (a login node). It hosts the Dask
scheduler, submits the worker jobs with `sbatch`, runs `imgsim run` on them and cancels the jobs
at the end. The TLS directory (deploy/make-certs.sh) must be on a filesystem the compute nodes
share; the workers need the package installed and the CSV paths readable.

    pip install dask-jobqueue
    python deploy/slurm/imgsim_slurm.py uploads.csv catalogue.csv --tls-dir ~/imgsim-tls \\
        --gpu-jobs 2 --fetch-jobs 2 --gpu-queue gpu --out matches.parquet
    python deploy/slurm/imgsim_slurm.py --dry-run --tls-dir ~/imgsim-tls   # print the job scripts

The scheduler listens on all interfaces of this node (the workers must reach it; TLS with
client certificates keeps everyone else out); the dashboard only on 127.0.0.1:8787 here, to
reach with `ssh -L 8787:127.0.0.1:8787 LOGIN_NODE`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed import Client, performance_report
from distributed.security import Security

import imgsim_dask

WALLTIME = "04:00:00"
FETCH_THREADS = 16


def gpu_job(queue: str | None) -> dict:
    """A model worker: one GPU (`--gres=gpu:1`), one thread, resource GPU=1, CPUs for TensorFlow."""
    return {
        "queue": queue,
        "cores": 1,
        "processes": 1,
        "job_cpu": 8,
        "memory": "32GB",
        "walltime": WALLTIME,
        "job_extra_directives": ["--gres=gpu:1"],
        "worker_extra_args": ["--resources", "GPU=1"],
    }


def fetch_job(queue: str | None) -> dict:
    """A fetch worker: CPU only, FETCH_THREADS threads, resource NET=FETCH_THREADS."""
    return {
        "queue": queue,
        "cores": FETCH_THREADS,
        "processes": 1,
        "memory": "16GB",
        "walltime": WALLTIME,
        "worker_extra_args": ["--resources", f"NET={FETCH_THREADS}"],
    }


def cluster_security(tls_dir: Path) -> Security:
    """TLS for every role: the scheduler here, the workers in their jobs, the client here."""
    ca, cluster, client = (str(tls_dir / name) for name in ("ca.pem", "cluster", "client"))
    return Security(
        tls_ca_file=ca,
        require_encryption=True,
        tls_scheduler_cert=f"{cluster}.pem",
        tls_scheduler_key=f"{cluster}-key.pem",
        tls_worker_cert=f"{cluster}.pem",
        tls_worker_key=f"{cluster}-key.pem",
        tls_client_cert=f"{client}.pem",
        tls_client_key=f"{client}-key.pem",
    )


def start_cluster(args: argparse.Namespace, security: Security) -> SLURMCluster:
    """A SLURMCluster whose jobs are `--gpu-jobs` model workers and `--fetch-jobs` fetch workers.

    The cluster's own job template is the GPU one; the fetch jobs are added to its worker
    specification, which Dask's SpecCluster allows to mix job kinds.
    """
    common = {"security": security, "protocol": "tls://", "interface": args.interface}
    cluster = SLURMCluster(
        **gpu_job(args.gpu_queue),
        **common,
        scheduler_options={"dashboard_address": "127.0.0.1:8787"},
    )
    fetch = {"cls": SLURMJob, "options": {**fetch_job(args.fetch_queue), **common}}
    cluster.worker_spec.update({f"fetch-{i}": fetch for i in range(args.fetch_jobs)})
    cluster.scale(jobs=len(cluster.worker_spec) + args.gpu_jobs)  # adds the GPU jobs, submits all
    return cluster


def print_job_scripts(args: argparse.Namespace, security: Security) -> None:
    """The two sbatch scripts, for a scheduler at a placeholder address; submits nothing."""
    for name, job in (("gpu", gpu_job(args.gpu_queue)), ("fetch", fetch_job(args.fetch_queue))):
        script = SLURMJob(
            scheduler="tls://SCHEDULER:8786",
            name=f"{name}-0",
            security=security,
            protocol="tls://",
            interface=args.interface,
            **job,
        ).job_script()
        print(f"# --- {name} job ---\n{script}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv1", nargs="?")
    parser.add_argument("csv2", nargs="?")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        required=True,
        help="ca.pem, cluster[-key].pem, client[-key].pem (deploy/make-certs.sh)",
    )
    parser.add_argument("--store", default="imgsim-store")
    parser.add_argument("--out", help="Result table: .parquet, .csv or a directory.")
    parser.add_argument("--weights", help="Weights file, or 'random' (tests only).")
    parser.add_argument("--gpu-jobs", type=int, default=1)
    parser.add_argument("--fetch-jobs", type=int, default=1)
    parser.add_argument("--gpu-queue", help="Partition of the GPU jobs.")
    parser.add_argument("--fetch-queue", help="Partition of the fetch jobs.")
    parser.add_argument("--interface", help="Network interface for Dask (e.g. ib0).")
    parser.add_argument("--report", default="imgsim-report.html")
    parser.add_argument("--dry-run", action="store_true", help="Print the job scripts and exit.")
    args = parser.parse_args()
    security = cluster_security(args.tls_dir)
    if args.dry_run:
        print_job_scripts(args, security)
        return
    if not args.csv1:
        parser.error("give CSV1 (and CSV2), or --dry-run")
    with start_cluster(args, security) as cluster, Client(cluster, security=security) as client:
        client.wait_for_workers(args.gpu_jobs + args.fetch_jobs, timeout=3600)
        with performance_report(filename=args.report):
            result = imgsim_dask.run(
                args.csv1,
                args.csv2,
                store=args.store,
                out=args.out,
                cluster=client,
                options=imgsim_dask.ExtractOptions(weights=args.weights, progress=True),
            )
    print(result.summary())


if __name__ == "__main__":
    main()
