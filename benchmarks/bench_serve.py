"""Reward serving under load: `mars-ray serve` (Ray Serve) with builtin:minilm, batched vs unbatched.

The server runs in its own process (local Ray, 2 CPUs, one replica with 1 CPU and ``--threads``
torch threads, HTTP on 127.0.0.1 only); the load comes from a second process, an asyncio client
(httpx) with C concurrent connections, each sending one (prompt, response) pair per ``POST /score``
and waiting for the answer before sending the next (closed loop). Every load run stops by itself:
after ``--requests`` requests or ``--seconds`` seconds, whichever comes first. Run::

    RAY_AUTH_MODE=disabled python benchmarks/bench_serve.py [--levels 1,16,64] [--reps 3] \
        [--requests 600] [--seconds 20] [--soak 10000] [--only batched,unbatched,soak] [--data hh|demo]

(about 25 minutes with the defaults on 2 cores, the soak 10 of them; ``--reps 1 --seconds 10 --soak 2000`` is a quick look).

Variants (all the same deployment; only ``serve.max_batch_size`` / ``serve.max_ongoing_requests`` differ):
- ``batched``: ``@serve.batch`` with up to 32 requests per batch, 10 ms wait for the batch to fill;
  a batch is length-sorted and run in forward passes of up to 32 sequences and 512 padded
  token slots (`serve.forward_max_tokens`; on a CPU a single sequence is already an efficient pass).
- ``unbatched``: ``max_batch_size 1``: one request per forward pass; the replica admits 2 requests at a
  time (``serve.max_ongoing_requests`` defaults to 2 x ``max_batch_size``), the rest wait in the proxy.
- ``unbatched-64``: the same with ``max_ongoing_requests 64``, as many admitted as the batched replica:
  separates what batching buys from what admission buys.
- ``soak``: the batched server under ``--soak`` requests from 64 clients; reports how many answers
  were 5xx (goal: zero) and how many requests failed in transport.

Data: one (prompt, response) pair per request, cycling through real HH-RLHF helpful-base pairs
(../shared/data; chosen and rejected responses alternate) or, with ``--data demo`` or when the file
is absent, the built-in demo pairs (shorter texts).

Columns: ``req/s`` answered requests per second, ``p50/p99 ms`` request latency seen by the client
(includes queueing behind other clients), ``batch`` mean requests per executed batch (server
counters), ``5xx``/``err`` error answers and transport failures. Each number is the median over
``--reps`` load runs. ``server RSS`` is the peak summed RSS of the server process tree (driver,
Ray's GCS/raylet, Serve controller, HTTP proxy, replica), ``load RSS`` the load generator's peak.
The load generator shares the 2 cores with the server, as a co-located RL worker would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA, peak_rss_mb

HH = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl"
MODEL = "builtin:minilm"
# variant -> (serve.max_batch_size, serve.max_ongoing_requests; None: the default, 2 x max_batch_size)
VARIANTS = {"batched": (32, None), "unbatched": (1, None), "unbatched-64": (1, 64)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ server process


def server(max_batch: int, threads: int, ongoing: int | None = None) -> None:
    """Start Ray + the reward app, print ``READY {json}``, serve until a line arrives on stdin,
    shut down, print ``DONE {json}`` with the peak RSS of this process tree."""
    import ray
    from bench_scoring import TreeRss

    from mars_ray.config import Config
    from mars_ray.runtime import init_ray
    from mars_ray.serve import app as serve_app

    port = _free_port()
    cfg = Config.load(
        overrides={
            "serve.port": str(port),
            "serve.max_batch_size": str(max_batch),
            "serve.batch_wait_timeout_s": "0.01",
            "serve.num_cpus": "1",
            "serve.threads": str(threads),
            "serve.app_name": "bench",
            "resources.num_cpus": "2",
            "serve.num_gpus": os.environ.get("BENCH_SERVE_GPUS", "0"),  # --gpus (the replica's GPU)
            **({"serve.max_ongoing_requests": str(ongoing)} if ongoing else {}),
        }
    )
    with TreeRss(every=0.25) as rss:
        t0 = time.perf_counter()
        init_ray(cfg.resources, log_to_driver=False)
        _, url = serve_app.start(cfg, MODEL)
        print("READY " + json.dumps({"url": url, "startup_s": round(time.perf_counter() - t0, 1)}), flush=True)
        sys.stdin.readline()
        serve_app.stop("bench")
        ray.shutdown()
    print("DONE " + json.dumps({"peak_rss_mb": rss.peak_mb, "driver_rss_mb": peak_rss_mb()}), flush=True)


# ------------------------------------------------------------------------------ load process


async def _load(url: str, items: list, concurrency: int, n: int, seconds: float, timeout: float) -> dict:
    try:
        import httpx2 as httpx  # the maintained httpx line installed with openai/huggingface_hub here
    except ImportError:  # pragma: no cover
        import httpx

    lat: list[float] = []
    status: dict[str, int] = {}
    errors: dict[str, int] = {}
    state = {"next": 0}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False) as client:

        async def worker() -> None:
            while state["next"] < n and time.perf_counter() < deadline:
                i = state["next"]
                state["next"] += 1
                prompt, response = items[i % len(items)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/score", json={"prompts": [prompt], "responses": [response]})
                except Exception as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                key = f"{r.status_code // 100}xx"
                status[key] = status.get(key, 0) + 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {
        "sent": state["next"],
        "ok": len(lat),
        "status": status,
        "errors": errors,
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "load_rss_mb": peak_rss_mb(),
    }


def load(url: str, items_file: Path, concurrency: int, n: int, seconds: float, timeout: float) -> None:
    items = json.loads(items_file.read_text())
    print(json.dumps(asyncio.run(_load(url, items, concurrency, n, seconds, timeout))), flush=True)


# ------------------------------------------------------------------------------ driver


def _items(data: str, n: int) -> tuple[list, str]:
    from mars_ray.config import Config
    from mars_ray.data import read_preferences

    if data == "hh" and HH.exists():
        cfg, name = Config.load(overrides={"data.path": str(HH)}), HH.name
    else:
        cfg, name = Config(), "builtin:demo"
    t = read_preferences(cfg.data, seed=cfg.seed).table.slice(0, n)
    p, c, r = (t.column(k).to_pylist() for k in ("prompt", "chosen", "rejected"))
    items = [(p[i], (c, r)[i % 2][i]) for i in range(len(p))]
    return items, f"{name}, {len(items)} pairs"


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def _run_load(url, items_file, concurrency, n, seconds, timeout=60.0) -> dict:
    before = _health(url)["counters"]
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load",
            url,
            "--items",
            str(items_file),
            "--concurrency",
            str(concurrency),
            "--requests",
            str(n),
            "--seconds",
            str(seconds),
            "--timeout",
            str(timeout),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + timeout + 60,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    after = _health(url)["counters"]
    batches = after["batches"] - before["batches"]
    res["batch"] = (after["requests"] - before["requests"]) / batches if batches else float("nan")
    res["largest_batch"] = after["largest_batch"]
    return res


class Server:
    """The server process: started with the variant's batch size, stopped on exit."""

    def __init__(self, max_batch: int, threads: int, ongoing: int | None = None) -> None:
        env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--server", str(max_batch), "--threads", str(threads)]
            + (["--ongoing", str(ongoing)] if ongoing else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.info = self._wait_for("READY ", 300)

    def _wait_for(self, prefix: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server process exited with {self.proc.wait()}")
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        raise TimeoutError(f"no {prefix.strip()} from the server within {timeout}s")

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        done = self._wait_for("DONE ", 120)
        self.proc.wait(timeout=60)
        return done


def _med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="1,16,64", help="concurrent clients per load run")
    ap.add_argument("--reps", type=int, default=3, help="load runs per level (medians)")
    ap.add_argument("--requests", type=int, default=600, help="requests per load run (upper bound)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per load run (upper bound)")
    ap.add_argument("--soak", type=int, default=10000, help="requests of the soak run (64 clients, batched)")
    ap.add_argument("--soak-seconds", type=float, default=1200.0, help="safety stop of the soak run")
    ap.add_argument("--only", default="batched,unbatched,unbatched-64,soak")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the replica")
    ap.add_argument("--data", choices=("hh", "demo"), default="hh")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--gpus", type=float, default=0.0, help="GPUs of the replica (benchmarks/gpu_smoke.py: 1)")
    # internal modes
    ap.add_argument("--server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ongoing", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--items", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.gpus:
        os.environ["BENCH_SERVE_GPUS"] = str(a.gpus)  # inherited by the server process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.server is not None:
        server(a.server, a.threads, a.ongoing)
        return 0
    if a.load:
        load(a.load, a.items, a.concurrency, a.requests, a.seconds, a.timeout)
        return 0

    only = a.only.split(",")
    levels = [int(x) for x in a.levels.split(",")]
    items, data_name = _items(a.data, a.pairs)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    items_file = tmp / "items.json"
    items_file.write_text(json.dumps(items))
    rows, servers, soak = [], {}, None
    for variant in [v for v in VARIANTS if v in only or (v == "batched" and "soak" in only)]:
        max_batch, ongoing = VARIANTS[variant]
        srv = Server(max_batch, a.threads, ongoing)
        try:
            url = srv.info["url"]
            _run_load(url, items_file, 4, 40, 30)  # warm-up (not reported)
            if variant in only:
                for c in levels:
                    runs = [_run_load(url, items_file, c, a.requests, a.seconds) for _ in range(a.reps)]
                    rows.append({"variant": variant, "clients": c, "runs": runs})
                    print(f"  {variant} {c:3d} clients: {[round(r['rps'], 1) for r in runs]} req/s", file=sys.stderr)
            if variant == "batched" and "soak" in only:
                soak = _run_load(url, items_file, 64, a.soak, a.soak_seconds)
                print(f"  soak: {soak['ok']} ok, {soak['status']}, errors {soak['errors']}", file=sys.stderr)
        finally:
            servers[variant] = {**srv.info, **srv.stop()}

    print(
        f"{MODEL}, one replica (1 CPU, {a.threads} torch threads), 2-core local Ray, HTTP on 127.0.0.1; "
        f"one pair per request from {data_name}; medians of {a.reps} load run(s) of <= {a.requests} requests "
        f"/ {a.seconds:.0f} s each; load5 {os.getloadavg()[1]:.2f}"
    )
    print(
        f"{'variant':12s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s} "
        f"{'5xx':>4s} {'err':>4s} {'load RSS MB':>11s}"
    )
    for r in rows:
        runs = r["runs"]
        print(
            f"{r['variant']:12s} {r['clients']:7d} {_med(runs, 'rps'):8.1f} {_med(runs, 'p50_ms'):8.1f} "
            f"{_med(runs, 'p99_ms'):8.1f} {_med(runs, 'batch'):6.1f} "
            f"{sum(x['status'].get('5xx', 0) for x in runs):4d} {sum(sum(x['errors'].values()) for x in runs):4d} "
            f"{max(x['load_rss_mb'] for x in runs):11.0f}"
        )
    for v, info in servers.items():
        print(
            f"server {v}: start-up {info['startup_s']} s, peak RSS {info['peak_rss_mb']:.0f} MB "
            f"(driver {info['driver_rss_mb']:.0f} MB)"
        )
    top = max(levels)
    b = next((_med(r["runs"], "rps") for r in rows if r["variant"] == "batched" and r["clients"] == top), None)
    u = next((_med(r["runs"], "rps") for r in rows if r["variant"] == "unbatched" and r["clients"] == top), None)
    if b and u:
        print(f"batched / unbatched throughput at {top} clients: {b / u:.2f}x (goal >= 5x)")
    w = next((_med(r["runs"], "rps") for r in rows if r["variant"] == "unbatched-64" and r["clients"] == top), None)
    if b and w:
        print(
            f"batched / unbatched-64 (one pair per forward pass, {top} requests admitted) at {top} clients: {b / w:.2f}x "
            "(what batching itself buys, apart from admission)"
        )
    if soak is not None:
        print(
            f"soak: {soak['sent']} requests from 64 clients in {soak['seconds']:.0f} s ({soak['rps']:.1f} req/s): "
            f"{soak['ok']} ok, {soak['status'].get('5xx', 0)} 5xx (goal 0), {soak['status'].get('4xx', 0)} 4xx, "
            f"{sum(soak['errors'].values())} transport errors {soak['errors'] or ''}; "
            f"p50 {soak['p50_ms']:.0f} ms, p99 {soak['p99_ms']:.0f} ms, mean batch {soak['batch']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
