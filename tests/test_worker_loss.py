"""Worker loss: a `dask worker` process SIGKILLed mid-run does not fail the extraction.

Two worker processes that can each fetch and run the model; one is killed once a few
partitions are written. Dask recomputes its lost tasks on the other (`retries=`), the
workers write every partition (a rewrite after a loss gives the same part file), and the
store equals an undisturbed run's.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from imgsim_dask import extract
from imgsim_dask.cluster import cluster_workers

PARTITION_ROWS = 6
ROWS = 120


@pytest.mark.slow
def test_worker_killed_mid_run_job_completes_with_same_output(
    process_cluster, tmp_path, image_dir, monkeypatch
):
    for _ in range(2):  # no nanny: a killed worker stays dead, as when its machine goes away
        process_cluster.add_worker("--nthreads", "2", "--resources", "GPU=1,NET=2", "--no-nanny")
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
    csv = tmp_path / "in.csv"
    pd.DataFrame({"url": [str(image_dir / f"{names[i % 5]}.jpg") for i in range(ROWS)]}).to_csv(
        csv, index=False
    )
    options = dict(weights="random", partition_rows=PARTITION_ROWS, batch_size=6)

    parts = tmp_path / "store" / "disturbed" / "rows.parquet"

    def written() -> int:
        return len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0

    with Client(process_cluster.address) as client:
        client.wait_for_workers(2, timeout=60)
        clean = extract(str(csv), "clean", str(tmp_path / "store"), cluster=client, **options)

        killed: dict = {}

        def kill_a_busy_worker_after_three_partitions():
            while written() < 3:
                time.sleep(0.005)
            busy = {addr: keys for addr, keys in client.processing().items() if keys}
            address, keys = next(iter(busy.items()))
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            killed.update(tasks=list(keys), written=written())

        thread = threading.Thread(target=kill_a_busy_worker_after_three_partitions, daemon=True)
        thread.start()
        disturbed = extract(
            str(csv), "disturbed", str(tmp_path / "store"), cluster=client, **options
        )
        thread.join(10)
        assert killed["tasks"], "the killed worker was running tasks"
        assert killed["written"] < ROWS // PARTITION_ROWS, "the kill landed mid-run"
        assert len(cluster_workers(client)) == 1

    assert written() == ROWS // PARTITION_ROWS
    assert np.array_equal(disturbed.features[:], clean.features[:], equal_nan=True)
    pd.testing.assert_frame_equal(disturbed.rows(), clean.rows())
    assert disturbed.meta.status_counts == {"ok": ROWS}
