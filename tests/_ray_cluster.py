"""A real local Ray cluster for tests: a head (`ray start --head --block`) and optional extra nodes
(`ray start --address=HEAD --block`), each in its own process group, temp dir and free ports.

Stopped by signalling only its own process groups: `ray stop` would also kill every other Ray on
the machine (another test's, a benchmark's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The `ray` and `mars-ray` scripts live beside this interpreter (the venv may not be activated).
BIN_DIR = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def ray_env() -> dict[str, str]:
    """The environment for `ray start` / `ray job submit`: no token auth, our venv's scripts first,
    and no inherited RAY_ADDRESS (which would point the CLI at some other cluster)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=BIN_DIR + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RAY_ADDRESS", None)
    if not shutil.which("ray", path=env["PATH"]):
        raise RuntimeError(f"the ray CLI is missing from {BIN_DIR}")
    return env


def _node_ports(head: bool) -> list[str]:
    """A free port for every port `ray start` would otherwise take from a fixed default, so these
    nodes can run beside each other and beside any other local Ray."""
    names = [
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ]
    if head:
        names.append("ray-client-server-port")
    return [f"--{name}={free_port()}" for name in names]


@dataclass
class LocalRayCluster:
    """Head + extra nodes on this machine. ``address`` is the dashboard (job submission / state API)
    URL; ``gcs_address`` is what another node or a driver joins."""

    address: str = ""
    gcs_address: str = ""
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    # Extra `ray start` arguments of every node (e.g. a small object store for simulated nodes).
    node_args: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        *,
        head_cpus: int = 2,
        worker_cpus: tuple[int, ...] = (),
        worker_gpus: int = 0,
        worker_resources: dict[str, float] | None = None,
        node_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> LocalRayCluster:
        """``worker_gpus`` / ``worker_resources``: what every extra node advertises (a simulated GPU
        node: Ray hands out GPU ids and sets CUDA_VISIBLE_DEVICES; torch still sees no CUDA)."""
        c = cls(env={**ray_env(), **(extra_env or {})}, node_args=list(node_args))
        try:
            c._start_head(head_cpus, timeout)
            for n in worker_cpus:
                c.add_node(n, num_gpus=worker_gpus, resources=worker_resources)
            if worker_cpus:
                c.wait_for_nodes(1 + len(worker_cpus), timeout)
        except BaseException:
            c.shutdown()
            raise
        return c

    def _popen(self, args: list[str]) -> subprocess.Popen:
        tmp = tempfile.mkdtemp(prefix="/tmp/mrc")  # short: Ray's socket paths have a length limit
        self.temp_dirs.append(tmp)
        p = subprocess.Popen(
            ["ray", "start", "--block", "--temp-dir", tmp, "--disable-usage-stats", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def _start_head(self, num_cpus: int, timeout: float) -> None:
        gcs, dash = free_port(), free_port()
        self._popen(
            [
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(num_cpus),
                *self.node_args,
                "--port",
                str(gcs),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dash),
                *_node_ports(head=True),
            ]
        )
        self.address, self.gcs_address = f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
        wait_http(f"{self.address}/api/version", timeout=timeout)

    def add_node(self, num_cpus: int, *, num_gpus: int = 0, resources: dict[str, float] | None = None) -> None:
        """Start one more node that joins the head (returns at once; see :meth:`wait_for_nodes`)."""
        import json

        extra = ["--num-gpus", str(num_gpus)]
        if resources:
            extra += ["--resources", json.dumps(resources)]
        self._popen(
            [
                f"--address={self.gcs_address}",
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(num_cpus),
                *extra,
                *self.node_args,
                *_node_ports(head=False),
            ]
        )

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [as_dict(n) for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], detail=True)]

    def wait_for_nodes(self, n: int, timeout: float) -> list[dict]:
        deadline = time.time() + timeout
        nodes: list[dict] = []
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited early with code {p.returncode}")
            try:
                nodes = self.alive_nodes()
            except Exception:  # the state API answers a little after the dashboard's /api/version
                nodes = []
            if len(nodes) >= n:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{len(nodes)} of {n} Ray nodes alive after {timeout}s")

    def shutdown(self) -> None:
        """SIGINT to every node's process group at once (the extra nodes first), a common 15 s to
        exit, then SIGKILL to whatever is left. (One after the other, a loaded machine spent up to
        15 s per node here.)"""
        procs = list(reversed(self.procs))
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.procs.clear()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.temp_dirs.clear()


def as_dict(state) -> dict:
    """A state-API row (a dataclass in current Ray, a dict in older ones) as a dict."""
    import dataclasses

    return dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state)


def submit(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (bounded)."""
    deadline = time.time() + 60
    while True:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in job.stderr or time.time() > deadline:
            return job
        time.sleep(2)
