"""Margin scoring of 2,000 real HH-RLHF pairs with builtin:minilm: plain loop vs the Ray Data stage.

Each variant runs in its own fresh process, repeated; the table gives median seconds, pairs/s, the
speed ratio against the plain loop measured in the same run, and peak memory. Run:
``python benchmarks/bench_scoring.py [--reps 3] [--ray-reps 1] [--pairs 2000] [--only plain,ray1]``
(about 30 minutes on 2 cores with the defaults: the plain loop alone is ~7 min per repetition).

Variants (batch size 32 everywhere, torch threads 2 unless said otherwise):
- ``plain transformers loop``: the naive way. AutoModelForSequenceClassification, input order,
  each batch tokenised by the tokenizer itself (pair truncation to min(512+192, model max) =
  512 tokens), padded to the batch's longest, chosen and rejected as separate forwards,
  torch.inference_mode. Timed from model load to margins (imports excluded).
- ``ours in-process (no Ray)``: mars_ray's ScoreActor + score_margins_local: the same scoring
  code as the Ray stage, without Ray (shows what the algorithm alone gains).
- ``Ray Data 1 actor x 2 CPU``: score_margins end to end, including Ray start-up, actor start
  (imports + model load) and collecting the result (ray.shutdown is not timed); 1 actor, num_cpus 2, torch threads 2.
- ``Ray Data 2 actors x 1 CPU``: the same with 2 actors, num_cpus 1, torch threads 1 each.

Peak RSS is the whole process tree (driver + Ray's raylet/GCS/workers/actors), sampled every
0.1 s; "driver MB" is the driver process alone (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA, peak_rss_mb, run_variant

HH = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl"
MODEL = "builtin:minilm"
BATCH = 32


class TreeRss:
    """Peak summed RSS of this process and all its descendants, sampled in a thread; also the CPU
    seconds they used (last sample per process), a measure of work that other load on the machine
    distorts less than wall time."""

    def __init__(self, every: float = 0.1, pss: bool = False) -> None:
        # pss: also the peak summed PSS (shared pages split between the processes that map them:
        # what the tree costs the machine; summed RSS counts a shared library once per process)
        self.pss, self.peak_pss = pss, 0
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.peak_detail: list[tuple[str, int]] = []  # (process, RSS) at the peak, largest first
        self.peak_pss_detail: list[tuple[str, int]] = []  # (process, PSS) at the PSS peak
        self._cpu: dict[tuple[int, float], float] = {}
        self._cpu0 = 0.0

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        t = me.cpu_times()
        self._cpu0 = t.user + t.system
        while not self._stop.is_set():
            total = pss_total = 0
            detail: list[tuple[str, int]] = []
            pss_detail: list[tuple[str, int]] = []
            for p in [me, *me.children(recursive=True)]:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss
                        total += rss
                        name = (p.cmdline() or [p.name()])[0][:40]
                        if self.pss:
                            pss = p.memory_full_info().pss
                            pss_total += pss
                            pss_detail.append((name, pss))
                        c = p.cpu_times()
                        self._cpu[(p.pid, p.create_time())] = c.user + c.system
                        detail.append((name, rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if pss_total > self.peak_pss:
                self.peak_pss, self.peak_pss_detail = pss_total, sorted(pss_detail, key=lambda d: -d[1])
            if total > self.peak:
                self.peak, self.peak_detail = total, sorted(detail, key=lambda d: -d[1])
            self._stop.wait(self.every)

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values()) - self._cpu0

    def __enter__(self) -> TreeRss:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if hasattr(self, "_t"):
            self._t.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def load_pairs(path: Path, n: int):
    from mars_ray.config import Config
    from mars_ray.data import read_preferences

    cfg = Config.load(overrides={"data.path": str(path)})
    return read_preferences(cfg.data, seed=cfg.seed).table.slice(0, n)


def bench_cfg(actors: int, cpus: float):
    from mars_ray.config import Config

    return Config.load(
        overrides={
            "resources.actors": actors,
            "resources.cpus_per_actor": cpus,
            "resources.batch_size": BATCH,
            "resources.num_cpus": 2,
        }
    )


# ------------------------------------------------------------------------------ variants


def plain(table) -> tuple[int, dict]:
    """The naive single-process loop (no mars_ray code)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.models import resolve_model

    path = resolve_model(MODEL).path
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    max_len = min(512 + 192, tok.model_max_length, model.config.max_position_embeddings)
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    margins = []
    padded = real = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), BATCH):
            rewards = []
            for resp in (chosen, rejected):
                enc = tok(
                    prompts[i : i + BATCH],
                    resp[i : i + BATCH],
                    truncation=True,
                    max_length=max_len,
                    padding="longest",
                    return_tensors="pt",
                )
                padded += enc["input_ids"].numel()
                real += int(enc["attention_mask"].sum())
                rewards.append(model(**enc).logits[:, 0])
            margins.extend((rewards[0] - rewards[1]).tolist())
    return len(margins), {"padded_tokens": padded, "real_tokens": real}


def ours_local(table) -> tuple[int, dict]:
    from mars_ray.stages.score import score_margins_local

    out = score_margins_local(table, model_ref=MODEL, cfg=bench_cfg(1, 2))
    return out.num_rows, {}


def ours_ray(table, actors: int, cpus: float) -> tuple[int, dict]:
    from mars_ray.runtime import init_ray
    from mars_ray.stages.score import score_margins

    cfg = bench_cfg(actors, cpus)
    t0 = time.perf_counter()
    init_ray(cfg.resources, log_to_driver=False)
    t_init = time.perf_counter() - t0
    out = score_margins(table, model_ref=MODEL, cfg=cfg)
    return out.num_rows, {"ray_init_s": round(t_init, 2)}


VARIANTS = {
    "plain": ("plain transformers loop", lambda t: plain(t)),
    "local": ("ours in-process (no Ray)", lambda t: ours_local(t)),
    "ray1": ("Ray Data 1 actor x 2 CPU", lambda t: ours_ray(t, 1, 2.0)),
    "ray2": ("Ray Data 2 actors x 1 CPU", lambda t: ours_ray(t, 2, 1.0)),
}


def child(variant: str, reps: int, path: Path, n: int) -> None:
    import torch  # imports are not timed (every variant pays them)
    import transformers  # noqa: F401

    torch.set_num_threads(2)
    if variant.startswith("ray"):
        import ray
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    table = load_pairs(path, n)
    fn = VARIANTS[variant][1]
    secs, extra, rows = [], {}, 0
    with TreeRss() as rss:
        for _ in range(reps):
            t0 = time.perf_counter()
            rows, info = fn(table)
            secs.append(time.perf_counter() - t0)
            for k, v in info.items():
                extra.setdefault(k, []).append(v)
            if variant.startswith("ray"):
                import ray

                ray.shutdown()  # not timed; the next rep starts Ray again
    load = os.getloadavg()[1]  # 5-minute load average at the end: other work on the machine distorts timings
    print(
        json.dumps(
            {
                "seconds": secs,
                "rows": rows,
                "peak_rss_mb": rss.peak_mb or peak_rss_mb(),
                "driver_rss_mb": peak_rss_mb(),
                "cpu_s_per_rep": rss.cpu_s / max(reps, 1),
                "load5": round(load, 2),
                **extra,
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the plain loop")
    ap.add_argument("--ray-reps", type=int, default=1, help="repetitions of the mars_ray variants (Ray and in-process)")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--file", type=Path, default=HH)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--save", type=Path, help="append each variant's result to this JSON-lines file")
    ap.add_argument("--resume", action="store_true", help="reuse the variants already in --save")
    a = ap.parse_args()
    if not a.file.exists():
        print(f"skip: {a.file} is absent (../shared/data not beside the project)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if a.variant:
        child(a.variant, a.reps, a.file, a.pairs)
        return 0
    saved = {}
    if a.save and a.resume and a.save.exists():
        for line in a.save.read_text().splitlines():
            r = json.loads(line)
            if r.get("pairs") == a.pairs:
                saved[r["key"]] = r
    rows = []
    for v in a.only.split(","):
        if v in saved:
            rows.append(saved[v])
            continue
        reps = a.reps if v == "plain" else a.ray_reps
        r = run_variant(Path(__file__), v, "--file", str(a.file), "--pairs", str(a.pairs), reps=reps)
        rows.append({"key": v, "variant": VARIANTS[v][0], "reps": reps, "pairs": a.pairs, **r})
        if a.save:
            with a.save.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        print(f"  done: {VARIANTS[v][0]} {[f'{s:.1f}' for s in r['seconds']]}", file=sys.stderr)
    n = rows[0]["rows"]
    print(f"{a.file.name}: {n} pairs, {MODEL}, batch {BATCH}, each variant in a fresh process (median of reps)")
    base = next((statistics.median(r["seconds"]) for r in rows if r["key"] == "plain"), None)
    print(
        f"{'variant':28s} {'reps':>4s} {'median s':>9s} {'pairs/s':>8s} {'vs plain':>9s} {'peak RSS MB':>12s} "
        f"{'driver MB':>10s} {'CPU s/rep':>10s} {'load5':>6s}"
    )
    for r in rows:
        med = statistics.median(r["seconds"])
        ratio = f"{base / med:8.2f}x" if base else "      n/a"
        print(
            f"{r['variant']:28s} {r['reps']:4d} {med:9.2f} {r['rows'] / med:8.1f} {ratio} "
            f"{r['peak_rss_mb']:12.0f} {r['driver_rss_mb']:10.0f} {r['cpu_s_per_rep']:10.0f} {r['load5']:6.1f}"
        )
    print(
        "CPU s/rep: CPU time of the whole process tree per repetition (incl. untimed set-up such as data "
        "loading); load5: the machine's 5-min load average when the variant ended (2 cores: > 2 means "
        "other work competed)"
    )
    for r in rows:
        if "padded_tokens" in r:
            p, q = r["padded_tokens"][0], r["real_tokens"][0]
            print(f"plain loop: {p} token slots for {q} real tokens -> {1 - q / p:.0%} padding")
        if "ray_init_s" in r:
            print(f"{r['variant']}: ray.init {statistics.median(r['ray_init_s']):.1f} s of the total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
