"""Memory of in-process stages over epochs: at most ``resources.in_process_keep`` stage actors.

A West-of-N run builds its stage actor with other arguments every epoch (the reward model it
scores with is r^{t-1}), so an unbounded in-process actor cache keeps one more generator and
reward model per epoch. Two variants, each in a fresh process, same run otherwise: ``keep 2`` (the
default) and ``keep 1000`` (what the cache did before it was bounded). Everything runs in one
process (``resources.in_process``, ``train.num_workers 0``): the built-in demo data (``--pairs``
training pairs), MiniLM reward model, SmolLM2 sampling N = 4 responses per pair, ``--epochs``
epochs, each variant on an empty generation cache of its own. Printed per epoch: the peak RSS of
the process during that epoch (sampled every 0.1 s).

``--strategy uniform --topup-rounds 2``: paraphrase top-up rounds instead (each round builds the
paraphrase actor with its own sampling temperature, and each epoch scores with r^{t-1}); a budget
of ``--budget`` synthetic pairs per epoch.

Run alone on the machine: ``python benchmarks/bench_stage_memory.py [--epochs 6] [--pairs 24]``
(about 5 minutes on 2 cores); ``--strategy uniform --topup-rounds 2 --budget 72`` for top-ups. The
demo texts pass the paraphrase gate so often, and the paraphrase stage's own resampling
(``paraphrase.retry_rounds``) refills what the gate drops, that no top-up round runs; with a real
file (``--data``, HH-RLHF: about a quarter of SmolLM2's paraphrases pass) and ``--retry-rounds 0``
the pools fall short, so they do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time


def _variant(args) -> None:
    from pathlib import Path

    import psutil

    from mars_ray import console
    from mars_ray.config import Config
    from mars_ray.models.resolve import cache_root, resolve_model
    from mars_ray.pipeline import run_mars

    out = tempfile.mkdtemp(prefix="bench_stage_memory_")
    # An empty generation cache for each variant (so both generate, and load SmolLM2), with the
    # converted built-in models linked from the default cache.
    resolve_model("builtin:smollm2")
    cache = Path(tempfile.mkdtemp(prefix="bench_stage_memory_cache_"))
    (cache / "builtin").symlink_to(cache_root() / "builtin", target_is_directory=True)
    cfg = Config.load(
        overrides={
            "data.max_pairs": str(int(args.pairs / 0.8) + 1),
            **({"data.path": args.data} if args.data else {}),
            "data.val_fraction": "0.1",
            "data.test_fraction": "0.1",
            "mars.strategy": args.strategy,
            "paraphrase.topup_rounds": str(args.topup_rounds),
            **({"paraphrase.retry_rounds": str(args.retry_rounds)} if args.retry_rounds is not None else {}),
            "mars.epochs": str(args.epochs),
            "mars.budget": str(args.budget),
            "mars.warmup_passes": "0",
            "resources.in_process": "true",
            "resources.in_process_keep": str(args.keep),
            "train.num_workers": "0",
            "output.dir": out,
            "model.cache_dir": str(cache),
        }
    )
    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.1)

    per_epoch: list[float] = []

    def on_epoch(row):
        per_epoch.append(peak[0] / 2**30)
        peak[0] = me.memory_info().rss

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run_mars(cfg, log=lambda m: None if not args.verbose else console.say(m), on_epoch=on_epoch)
    stop.set()
    rounds = []
    for e in range(1, args.epochs + 1):
        summ = json.loads((Path(out) / "epochs" / f"{e:03d}" / "augment_summary.json").read_text())
        rounds.append(len((summ.get("paraphrase") or {}).get("topup_rounds", [])))
    print(json.dumps({"keep": args.keep, "peak_gib": per_epoch, "s": time.perf_counter() - t0, "topups": rounds}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--strategy", choices=["west-of-n", "uniform", "mars-nosem"], default="west-of-n")
    ap.add_argument("--topup-rounds", type=int, default=2)
    ap.add_argument("--keep", type=int, default=None, help="run one variant in this process")
    ap.add_argument(
        "--retry-rounds", type=int, default=None, help="paraphrase.retry_rounds (0: gate rejections leave pools short)"
    )
    ap.add_argument("--data", default=None, help="a preference file instead of the built-in demo data")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.keep is not None:
        _variant(args)
        return 0
    rows = []
    for keep in (2, 1000):
        cmd = [sys.executable, __file__, "--keep", str(keep), "--epochs", str(args.epochs)]
        cmd += ["--pairs", str(args.pairs), "--budget", str(args.budget), "--strategy", args.strategy]
        cmd += ["--topup-rounds", str(args.topup_rounds)] + (["--data", args.data] if args.data else [])
        cmd += ["--retry-rounds", str(args.retry_rounds)] if args.retry_rounds is not None else []
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    what = "West-of-N" if args.strategy == "west-of-n" else f"{args.strategy}, {args.topup_rounds} top-up rounds"
    print(
        f"{what}, {args.epochs} epochs in process, {args.pairs} pairs of {args.data or 'builtin:demo'}, budget {args.budget}"
    )
    print("| in_process_keep | " + " | ".join(f"epoch {i + 1}" for i in range(args.epochs)) + " | wall |")
    print("|---|" + "---|" * (args.epochs + 1))
    for r in rows:
        cells = " | ".join(f"{g:.2f} GiB" for g in r["peak_gib"])
        print(f"| {r['keep']} | {cells} | {r['s']:.0f} s |")
    print("top-up rounds run per epoch:", rows[0].get("topups"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
