"""Ray entry points: the data layer as a Ray Dataset, and `mars-ray` as a submitted Ray job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

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
    lengths = ds.map_batches(lambda b: {"pair_id": b["pair_id"], "n": [len(c) for c in b["chosen"]]}, batch_format="numpy")
    assert sorted(r["pair_id"] for r in lengths.take_all()) == sorted(res.table.column("pair_id").to_pylist())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (`ray start --head --block`) in its own temp dir and process group.

    Stopped by signalling only its own process group: `ray stop` would also kill every other
    Ray on the machine, including the one this test session uses.
    """
    # The `ray` and `mars-ray` scripts live beside this interpreter (the venv may not be activated).
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    assert shutil.which("ray", path=env["PATH"]), f"the ray CLI is missing from {bin_dir}"
    env.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="/tmp/mrh")
    gcs, dash = _free_port(), _free_port()
    # Every fixed-default port gets a free one, so this head can run beside another local Ray.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--temp-dir", tmp, "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{address}/api/version", timeout=120)
        yield address, env
    finally:
        for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        shutil.rmtree(tmp, ignore_errors=True)


def submit(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (bounded)."""
    deadline = time.time() + 60
    while True:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in job.stderr or time.time() > deadline:
            return job
        time.sleep(2)


def test_ray_job_submit_data_prepare(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "job_out"
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "mars-ray", "data", "prepare", "--output.dir", str(out), "--data.max_pairs", "120", "--no-lengths"]
    t0 = time.time()
    job = submit(cmd, env)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "read 333 = kept 333 + quarantined 0" in job.stdout  # the job's own output, streamed back
    report = json.loads((out / "data_report.json").read_text())
    assert report["selected"] == 120 and report["read"] == report["kept"] + report["quarantined"]
    assert (out / "pairs.parquet").exists() and (out / "config.yaml").exists()
    # The same command locally gives the same pairs.
    local = tmp_path / "local_out"
    subprocess.run(["mars-ray", "data", "prepare", "--output.dir", str(local), "--data.max_pairs", "120", "--no-lengths"],
                   check=True, capture_output=True, env=env)
    assert json.loads((local / "data_report.json").read_text())["splits"] == report["splits"]
    print(f"job submit round trip {time.time() - t0:.1f}s")


def test_failing_job_exits_nonzero(ray_head, tmp_path):
    address, env = ray_head
    job = submit(
        ["ray", "job", "submit", "--address", address, "--", "mars-ray", "data", "prepare",
         "--data.path", str(tmp_path / "missing.jsonl"), "--output.dir", str(tmp_path / "o")],
        env,
    )
    assert job.returncode != 0
    assert "file not found" in job.stdout + job.stderr
