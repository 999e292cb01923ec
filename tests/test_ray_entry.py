"""Ray entry points: the data layer as a Ray Dataset, and `mars-ray` as a submitted Ray job."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from _ray_cluster import LocalRayCluster, submit
from conftest import ROOT

from mars_ray.config import Config
from mars_ray.core.schema import PAIR_SCHEMA
from mars_ray.data import read_preferences, to_ray_dataset

pytestmark = pytest.mark.ray


def test_prepared_table_as_ray_dataset(ray_local):
    cfg = Config()
    res = read_preferences(cfg.data, seed=0)
    ds = to_ray_dataset(res.table)
    assert ds.count() == res.table.num_rows
    assert ds.schema().base_schema.equals(PAIR_SCHEMA)
    # Stream a transformation through Ray Data and get every pair back.
    lengths = ds.map_batches(
        lambda b: {"pair_id": b["pair_id"], "n": [len(c) for c in b["chosen"]]}, batch_format="numpy"
    )
    assert sorted(r["pair_id"] for r in lengths.take_all()) == sorted(res.table.column("pair_id").to_pylist())


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (`ray start --head --block`) in its own temp dir and process group
    (see tests/_ray_cluster.py: stopped by signalling only its own process group)."""
    cluster = LocalRayCluster.start(head_cpus=2)
    try:
        yield cluster.address, cluster.env
    finally:
        cluster.shutdown()


def test_ray_job_submit_data_prepare(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "job_out"
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "mars-ray",
        "data",
        "prepare",
        "--output.dir",
        str(out),
        "--data.max_pairs",
        "120",
        "--no-lengths",
    ]
    t0 = time.time()
    job = submit(cmd, env)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "read 333 = kept 333 + quarantined 0" in job.stdout  # the job's own output, streamed back
    report = json.loads((out / "data_report.json").read_text())
    assert report["selected"] == 120 and report["read"] == report["kept"] + report["quarantined"]
    assert (out / "pairs.parquet").exists() and (out / "config.yaml").exists()
    # The same command locally gives the same pairs.
    local = tmp_path / "local_out"
    subprocess.run(
        ["mars-ray", "data", "prepare", "--output.dir", str(local), "--data.max_pairs", "120", "--no-lengths"],
        check=True,
        capture_output=True,
        env=env,
    )
    assert json.loads((local / "data_report.json").read_text())["splits"] == report["splits"]
    print(f"job submit round trip {time.time() - t0:.1f}s")


def test_failing_job_exits_nonzero(ray_head, tmp_path):
    address, env = ray_head
    job = submit(
        [
            "ray",
            "job",
            "submit",
            "--address",
            address,
            "--",
            "mars-ray",
            "data",
            "prepare",
            "--data.path",
            str(tmp_path / "missing.jsonl"),
            "--output.dir",
            str(tmp_path / "o"),
        ],
        env,
    )
    assert job.returncode != 0
    assert "file not found" in job.stdout + job.stderr


def test_state_api_noise_filter_drops_only_the_cleaner_poll_message():
    """The private local Ray runs without the dashboard (hence without the state API); the worker
    set-up hook drops Ray Train's per-second "cannot query the controller" warning, nothing else."""
    import logging

    from mars_ray.runtime import quiet_state_api_pollers

    quiet_state_api_pollers()
    quiet_state_api_pollers()  # idempotent: one filter
    logger = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    assert len(logger.filters) == 1

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    assert not logger.filter(
        record("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
    )
    assert logger.filter(
        record("Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group")
    )


def test_a_stage_waits_for_the_cpus_a_finished_stage_still_holds(ray_local):
    """wait_for_cpus: returns as soon as the CPUs are free; while an actor holds them it waits up to
    its timeout and then lets the stage start anyway (Ray schedules it when they free)."""
    import time

    from mars_ray.stages.common import wait_for_cpus

    ray = ray_local
    t0 = time.monotonic()
    wait_for_cpus(1.0, timeout_s=5.0)
    assert time.monotonic() - t0 < 1.0  # free: no wait

    @ray.remote(num_cpus=2)
    class Holder:
        def ping(self):
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    t0 = time.monotonic()
    wait_for_cpus(1.0, timeout_s=1.0)
    waited = time.monotonic() - t0
    assert 0.9 <= waited < 3.0, waited
    ray.kill(holder)
    t0 = time.monotonic()
    wait_for_cpus(1.0, timeout_s=10.0)  # released by the kill within a few seconds
    assert time.monotonic() - t0 < 8.0
    t0 = time.monotonic()
    wait_for_cpus(64.0, timeout_s=10.0)  # more than the cluster has: waiting could never help
    assert time.monotonic() - t0 < 1.0
