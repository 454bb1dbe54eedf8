#!/usr/bin/env bash
# Start an imgsim cluster by hand on this machine, over TLS: a scheduler, one model worker per GPU
# (resource GPU=1, one thread: the model owns its process) and CPU fetch workers (resource NET).
# On several machines run the same `dask worker` lines there, with the scheduler file on a shared
# filesystem (or the scheduler's tls:// address instead of --scheduler-file).
#
# usage: deploy/local/start-cluster.sh TLS_DIR [SCHEDULER_FILE]
#   TLS_DIR holds ca.pem, cluster.pem, cluster-key.pem (deploy/make-certs.sh makes them)
#   GPUS (default 1), FETCH_WORKERS (default 1), FETCH_THREADS (default 8): how many of each
#   PORT (default 8786), DASHBOARD_PORT (default 8787): the scheduler's ports (0: any free one)
#   HOST (default 127.0.0.1): the scheduler's interface. Anything but loopback exposes the
#     scheduler port to that network: TLS with client certificates is what keeps others out.
# Then, with the client certificate:
#   imgsim run a.csv b.csv --scheduler-file SCHEDULER_FILE \
#       --tls-ca-file TLS_DIR/ca.pem --tls-cert TLS_DIR/client.pem --tls-key TLS_DIR/client-key.pem
# The dashboard listens on HOST:8787 (plain HTTP, no login: keep HOST private or tunnel to it).
# Ctrl-C (or SIGTERM) stops the scheduler and every worker.
set -euo pipefail

tls=${1:?usage: start-cluster.sh TLS_DIR [SCHEDULER_FILE]}
scheduler_file=${2:-scheduler.json}
host=${HOST:-127.0.0.1}
gpus=${GPUS:-1}
fetch_workers=${FETCH_WORKERS:-1}
fetch_threads=${FETCH_THREADS:-8}
cluster_tls=(--tls-ca-file "$tls/ca.pem" --tls-cert "$tls/cluster.pem" --tls-key "$tls/cluster-key.pem")

trap 'exit 130' INT
trap 'exit 143' TERM
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
rm -f "$scheduler_file"
dask scheduler --protocol tls --host "$host" --port "${PORT:-8786}" \
    --dashboard-address "$host:${DASHBOARD_PORT:-8787}" --scheduler-file "$scheduler_file" \
    "${cluster_tls[@]}" &
while [ ! -s "$scheduler_file" ]; do sleep 0.5; done

for ((gpu = 0; gpu < gpus; gpu++)); do
    CUDA_VISIBLE_DEVICES=$gpu dask worker --scheduler-file "$scheduler_file" --host "$host" \
        --name "model-$gpu" --nthreads 1 --resources "GPU=1" --no-dashboard "${cluster_tls[@]}" &
done
for ((i = 0; i < fetch_workers; i++)); do
    CUDA_VISIBLE_DEVICES= dask worker --scheduler-file "$scheduler_file" --host "$host" \
        --name "fetch-$i" --nthreads "$fetch_threads" --resources "NET=$fetch_threads" \
        --no-dashboard "${cluster_tls[@]}" &
done
echo "cluster up: scheduler file $scheduler_file, dashboard http://$host:${DASHBOARD_PORT:-8787}/status"
wait
