"""deploy/: every recipe checked by the tool that reads it, or run here with stand-ins.

Kubernetes manifests against the dask-kubernetes operator's own CRD schemas (unknown fields
included), Helm values against the dask/dask chart's keys, the Dockerfile's user and build
argument, the certificate script through OpenSSL and Dask, the hand-started cluster for real,
and the SLURM example with stand-in `sbatch`/`scancel` that run the jobs on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import yaml
from distributed import Client
from distributed.security import Security

from imgsim_dask.cluster import cluster_workers

from support.cluster import ProcessCluster

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CRDS = (
    Path(find_spec("dask_kubernetes").submodule_search_locations[0])
    / "operator/deployment/helm/dask-kubernetes-operator/crds"
)
TLS_FLAGS = ("--tls-ca-file", "--tls-cert", "--tls-key")


def _env_with_dask_on_path() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def made_certs(tmp_path_factory) -> Path:
    """The certificates deploy/make-certs.sh writes."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("made-certs") / "tls"
    subprocess.run(["bash", DEPLOY / "make-certs.sh", root], check=True, capture_output=True)
    return root


def test_make_certs_writes_a_chain_dask_accepts(made_certs):
    verified = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            made_certs / "ca.pem",
            made_certs / "cluster.pem",
            made_certs / "client.pem",
        ],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    security = Security(
        tls_ca_file=str(made_certs / "ca.pem"),
        require_encryption=True,
        **{
            f"tls_{role}_{part}": str(made_certs / f"{name}{suffix}.pem")
            for role, name in (
                ("scheduler", "cluster"),
                ("worker", "cluster"),
                ("client", "client"),
            )
            for part, suffix in (("cert", ""), ("key", "-key"))
        },
    )
    for role in ("scheduler", "worker"):
        assert security.get_listen_args(role)["ssl_context"] is not None
    for role in ("worker", "client"):
        assert security.get_connection_args(role)["ssl_context"] is not None
    assert oct((made_certs / "client-key.pem").stat().st_mode)[-3:] == "600"


# --- Kubernetes: dask-kubernetes operator ------------------------------------------------------


def _crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"{kind.lower()}.yaml").read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return served["schema"]["openAPIV3Schema"]


def _unknown_fields(value, schema: dict, path: str = ""):
    """Paths in `value` that `schema` does not declare (what the API server would drop)."""
    if isinstance(value, dict):
        if "properties" in schema:
            for key, item in value.items():
                if key not in schema["properties"]:
                    yield f"{path}.{key}"
                else:
                    yield from _unknown_fields(item, schema["properties"][key], f"{path}.{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                yield from _unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], f"{path}[{i}]")


def _daskjob_documents() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes/imgsim-daskjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def _pods(docs: dict[str, dict]) -> dict[str, dict]:
    job, group = docs["DaskJob"], docs["DaskWorkerGroup"]
    return {
        "job": job["spec"]["job"]["spec"],
        "scheduler": job["spec"]["cluster"]["spec"]["scheduler"]["spec"],
        "fetch": job["spec"]["cluster"]["spec"]["worker"]["spec"],
        "gpu": group["spec"]["worker"]["spec"],
    }


def _option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_daskjob_manifests_follow_the_operator_crds():
    docs = _daskjob_documents()
    assert set(docs) == {"DaskJob", "DaskWorkerGroup"}
    for kind, doc in docs.items():
        assert doc["apiVersion"] == "kubernetes.dask.org/v1"
        schema = _crd_schema(kind)
        jsonschema.validate(doc, schema)
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        assert list(_unknown_fields(doc["spec"], schema["properties"]["spec"], "spec")) == [], kind


def test_daskjob_has_tls_everywhere_and_the_two_worker_kinds():
    docs = _daskjob_documents()
    job_name = docs["DaskJob"]["metadata"]["name"]
    assert docs["DaskWorkerGroup"]["spec"]["cluster"] == job_name
    pods = _pods(docs)
    for role, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        (container,) = pod["containers"]
        args = container["args"]
        assert all(flag in args for flag in TLS_FLAGS), role
        if role != "scheduler":  # the operator would otherwise inject tcp://
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["DASK_SCHEDULER_ADDRESS"] == f"tls://{job_name}-scheduler:8786", role
    assert _option(pods["scheduler"]["containers"][0]["args"], "--protocol") == "tls"
    service = docs["DaskJob"]["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert service["type"] == "ClusterIP"

    fetch_args = pods["fetch"]["containers"][0]["args"]
    assert _option(fetch_args, "--resources") == f"NET={_option(fetch_args, '--nthreads')}"
    gpu = pods["gpu"]["containers"][0]
    assert _option(gpu["args"], "--nthreads") == "1"
    assert _option(gpu["args"], "--resources") == "GPU=1"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in pods["fetch"]["containers"][0]["resources"].get("limits", {})
    assert all(
        _option(pods["job"]["containers"][0]["args"], flag).endswith(f"client{suffix}.pem")
        for flag, suffix in (("--tls-cert", ""), ("--tls-key", "-key"))
    )


# --- Kubernetes: dask/dask Helm chart ----------------------------------------------------------

# Keys of the dask/dask chart's values.yaml (helm-chart repository, dask/values.yaml).
CHART_KEYS = {
    "scheduler": {
        "name",
        "enabled",
        "image",
        "replicas",
        "serviceType",
        "loadBalancerIP",
        "servicePort",
        "serviceAnnotations",
        "extraArgs",
        "env",
        "resources",
        "tolerations",
        "affinity",
        "nodeSelector",
        "securityContext",
        "serviceAccountName",
        "metrics",
        "livenessProbe",
        "readinessProbe",
    },
    "worker": {
        "name",
        "image",
        "replicas",
        "strategy",
        "custom_scheduler_url",
        "default_resources",
        "env",
        "extraArgs",
        "resources",
        "mounts",
        "annotations",
        "tolerations",
        "affinity",
        "nodeSelector",
        "securityContext",
        "serviceAccountName",
        "port",
        "portDashboard",
        "threads_per_worker",
        "metrics",
        "livenessProbe",
        "readinessProbe",
    },
    "webUI": {"name", "servicePort", "ingress"},
    "jupyter": {
        "name",
        "enabled",
        "rbac",
        "image",
        "serviceType",
        "servicePort",
        "password",
        "passwordHint",
        "env",
        "command",
        "args",
        "extraConfig",
        "resources",
        "mounts",
        "tolerations",
        "affinity",
        "nodeSelector",
        "securityContext",
        "serviceAccountName",
        "ingress",
        "livenessProbe",
        "readinessProbe",
    },
}


def _chart_values() -> dict:
    return yaml.safe_load((DEPLOY / "kubernetes/dask-chart-values.yaml").read_text())


def test_helm_values_use_the_chart_keys():
    values = _chart_values()
    assert set(values) <= set(CHART_KEYS) | {"additional_worker_groups"}
    for section, keys in CHART_KEYS.items():
        assert set(values.get(section, {})) <= keys, section
    for group in values["additional_worker_groups"]:
        assert set(group) <= CHART_KEYS["worker"], group["name"]
    assert {"repository", "tag"} <= set(values["worker"]["image"])


def test_helm_values_run_tls_fetch_and_gpu_workers(made_certs):
    values = _chart_values()
    assert values["scheduler"]["extraArgs"] == ["--protocol", "tls"]
    assert values["scheduler"]["serviceType"] == "ClusterIP"
    assert values["webUI"]["ingress"]["enabled"] is False
    assert values["jupyter"]["enabled"] is False
    worker = values["worker"]
    assert worker["custom_scheduler_url"] == "tls://imgsim-dask-scheduler:8786"  # release imgsim
    assert worker["extraArgs"] == ["--resources", f"NET={worker['threads_per_worker']}"]
    (gpu,) = values["additional_worker_groups"]
    assert gpu["threads_per_worker"] == 1 and gpu["extraArgs"] == ["--resources", "GPU=1"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1

    # The environment the chart gives each pod, with the secret's PEM text, is a Dask TLS setup.
    secret = {
        name: (made_certs / name).read_text()
        for name in ("ca.pem", "cluster.pem", "cluster-key.pem")
    }
    for role in ("scheduler", "worker"):
        env = {
            e["name"]: e.get("value") or secret[e["valueFrom"]["secretKeyRef"]["key"]]
            for e in values[role]["env"]
        }
        check = (
            "from distributed.security import Security; s = Security(); "
            "assert s.require_encryption is True; "
            f"assert s.get_listen_args({role!r})['ssl_context']; "
            f"assert s.get_connection_args({role!r})['ssl_context']"
        )
        result = subprocess.run(
            [sys.executable, "-c", check],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr


# --- Docker ------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "docker/Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_runs_as_a_user_with_baked_weights_and_gpu_tensorflow():
    instructions = _dockerfile_instructions()
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert [op for op, _ in instructions].index("USER") > max(
        i for i, (op, _) in enumerate(instructions) if op == "RUN"
    )
    args = [arg for op, arg in instructions if op == "ARG"]
    assert any(arg.startswith("WEIGHTS") for arg in args)
    copies = [arg for op, arg in instructions if op == "COPY"]
    assert any(
        c.startswith("${WEIGHTS} ") and "keras/models/mobilenet_1_0_224_tf_no_top.h5" in c
        for c in copies
    )
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert '"tensorflow[and-cuda]' in runs and "ensure_converted_weights" in runs
    assert "/usr/local/bin/dask-scheduler" in runs and "/usr/local/bin/dask-worker" in runs


# --- Local cluster by hand ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cluster
def test_local_recipe_starts_a_tls_cluster_with_both_worker_kinds(made_certs, tmp_path):
    env = {
        **_env_with_dask_on_path(),
        "PORT": "0",
        "DASHBOARD_PORT": "0",
        "GPUS": "1",
        "FETCH_WORKERS": "1",
        "FETCH_THREADS": "2",
    }
    cluster = ProcessCluster(tmp_path, env=env)  # the script starts the scheduler and workers
    script = cluster.popen(
        ["bash", DEPLOY / "local/start-cluster.sh", made_certs, cluster.scheduler_file]
    )
    try:
        address = cluster.wait_for_scheduler()
        assert address.startswith("tls://127.0.0.1:")
        security = Security(
            tls_ca_file=str(made_certs / "ca.pem"),
            tls_client_cert=str(made_certs / "client.pem"),
            tls_client_key=str(made_certs / "client-key.pem"),
            require_encryption=True,
        )
        with Client(address, security=security, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            workers = cluster_workers(client).values()
            kinds = {w["name"]: (w["resources"], w["nthreads"]) for w in workers}
        assert kinds == {"model-0": ({"GPU": 1}, 1), "fetch-0": ({"NET": 2}, 2)}
    finally:
        cluster.stop(timeout=60)  # SIGTERM
    assert script.returncode == 143


# --- SLURM -------------------------------------------------------------------------------------

SBATCH_STAND_IN = """#!/usr/bin/env bash
# Stands in for sbatch: runs a copy of the job script in its own process group (job id: its pid).
script=$(mktemp "$JOBS_DIR/job-XXXXXX.sh")
cp "$1" "$script"
setsid bash "$script" > "$script.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""
SCANCEL_STAND_IN = """#!/usr/bin/env bash
# Stands in for scancel: ends each job's process group.
for job in "$@"; do kill -TERM -- "-$job" 2>/dev/null || true; done
"""


def test_sbatch_script_asks_for_gpus_and_starts_both_worker_kinds():
    script = (DEPLOY / "slurm/imgsim.sbatch").read_text()
    assert subprocess.run(["bash", "-n", DEPLOY / "slurm/imgsim.sbatch"]).returncode == 0
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    gpu_component = directives[directives.index("#SBATCH hetjob") + 1 :]
    assert any("--gres=gpu:1" in line for line in gpu_component)
    assert '--nthreads 1 --resources "GPU=1"' in script
    assert '--resources "NET=$fetch_threads"' in script
    assert script.count('"${cluster_tls[@]}"') == 3  # the scheduler and both worker steps
    assert '--tls-cert "$tls/client.pem"' in script


def test_slurm_example_prints_gpu_and_fetch_job_scripts(made_certs):
    result = subprocess.run(
        [
            sys.executable,
            DEPLOY / "slurm/imgsim_slurm.py",
            "--dry-run",
            "--tls-dir",
            made_certs,
            "--gpu-queue",
            "gpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    gpu, fetch = result.stdout.split("# --- fetch job ---")
    assert "#SBATCH --gres=gpu:1" in gpu and "#SBATCH -p gpu" in gpu
    assert "--nthreads 1 " in gpu and "--resources GPU=1" in gpu
    assert "--gres" not in fetch and "--nthreads 16 " in fetch and "--resources NET=16" in fetch
    for script in (gpu, fetch):
        assert "tls://SCHEDULER:8786" in script
        assert f"--tls-cert {made_certs / 'cluster.pem'}" in script


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_example_runs_a_job_with_stand_in_sbatch(made_certs, tmp_path, image_dir):
    """The real SLURMCluster path: TLS scheduler here, one GPU job and one fetch job, `run`."""
    bin_dir, jobs_dir = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs_dir.mkdir()
    for name, text in (("sbatch", SBATCH_STAND_IN), ("scancel", SCANCEL_STAND_IN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    csv = tmp_path / "in.csv"
    pd.DataFrame(
        {
            "url": [str(image_dir / f"{n}.jpg") for n in ("chelsea", "coffee")]
            + [str(image_dir / "missing.jpg")]
        }
    ).to_csv(csv, index=False)
    env = _env_with_dask_on_path()
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        JOBS_DIR=str(jobs_dir),
        KERAS_HOME=str(tmp_path / "keras"),
    )
    result = subprocess.run(
        [
            sys.executable,
            DEPLOY / "slurm/imgsim_slurm.py",
            csv,
            "--tls-dir",
            made_certs,
            "--interface",
            "lo",
            "--weights",
            "random",
            "--store",
            tmp_path / "store",
            "--out",
            tmp_path / "pairs.csv",
            "--report",
            tmp_path / "report.html",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "".join(p.read_text() for p in jobs_dir.glob("*.log"))
    assert result.returncode == 0, result.stderr + logs
    scripts = [p.read_text() for p in jobs_dir.glob("job-*.sh")]
    assert sorted("--gres=gpu:1" in s for s in scripts) == [False, True]
    assert all("tls://127.0.0.1:" in s for s in scripts)
    meta = json.loads((tmp_path / "store/in/meta.json").read_text())
    assert meta["status_counts"] == {"not_found": 1, "ok": 2}
    assert (tmp_path / "report.html").stat().st_size > 0
    deadline = time.monotonic() + 30  # scancel stopped the jobs
    while "dask_worker" in _processes_of(jobs_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "dask_worker" not in _processes_of(jobs_dir)


def _processes_of(jobs_dir: Path) -> str:
    """Command lines of running processes started from a job script in `jobs_dir`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(jobs_dir).encode() in environ:
            found.append(cmdline)
    return "\n".join(found)
