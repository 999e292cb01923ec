"""Paraphrase generation with builtin:smollm2: the Ray Data stage vs one text at a time, and a rerun.

Real texts (chosen responses of PKU-SafeRLHF, 60-400 characters), ``--n`` paraphrases each with
the epoch's decoding (greedy for the first, sampled candidates by index after it, no-repeat 3-grams;
with ``--n`` > 1 the loop runs an n-beam search instead, so only n = 1 compares like with like), and
the epoch's per-text output cap (``output_cap``: the length the quality gate would accept). Both
variants generate exactly the same requests; each runs in a fresh process:

- ``one text at a time``: ``LocalChatGenerator.generate([request], n, max_new_tokens=[cap])`` per
  text with ``model.generate`` (``ragged=False``), no cache: what a naive loop does. Timed from
  model load to the last paraphrase.
- ``Ray Data stage``: ``ParaphraseActor`` on an actor pool (1 actor x 2 CPUs) through
  ``map_with_actors``, end to end: Ray start, actor start (SmolLM2 + MiniLM load), generation in
  batches of ``--batch`` requests, the quality gate on every output (extra work the loop does
  not do), collection. No resampling rounds, so the generated outputs are the same number.
- ``Ray Data stage, rerun``: the same request against the cache the previous run filled: the
  goal is zero generations. The actor loads SmolLM2 only on its first cache miss, so the rerun
  never loads it; its time plus one model load (the loop's) is the stage's fixed start-up, and
  the last line compares generation alone: the loop minus its model load against the stage
  minus that start-up.

The stage decodes greedy requests with ``ragged_greedy`` (the template's shared prefix computed
once per batch, rows leaving the batch as they end) on requests sorted longest first; the loop
calls ``model.generate`` one text at a time. Both give the same texts.

Run: ``python benchmarks/bench_paraphrase.py [--texts 64] [--n 1] [--batch 32]`` (about 4 minutes
on 2 cores with the defaults, 13 with ``--texts 256``). The stage's start-up (20-30 s here) is paid
once per run, so its end-to-end ratio grows with the number of texts towards the generation-alone
ratio (measured here: 2.79x at 64 texts, 3.74x at 256). ``outputs/s`` = paraphrases per second; ``peak RSS`` is the whole
process tree (driver + Ray's processes + the actor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA, run_variant
from bench_scoring import TreeRss

PKU = SHARED_DATA / "pku_saferlhf_v0test_safe_vs_unsafe_3590.jsonl"


def texts(k: int) -> list[str]:
    out, seen = [], set()
    with PKU.open(encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["chosen"].strip()
            if 60 <= len(t) <= 400 and t not in seen:
                seen.add(t)
                out.append(t)
            if len(out) == k:
                break
    return out


def cfg_for(args, cache_dir: str):
    from mars_ray.config import Config

    return Config.load(
        overrides={
            "paraphrase.max_new_tokens": str(args.max_new_tokens),
            "paraphrase.batch_size": str(args.batch),
            "paraphrase.retry_rounds": "0",
            "model.cache_dir": cache_dir,
            "resources.actors": "1",
            "resources.cpus_per_actor": "2",
        }
    )


def child(args) -> None:
    import dataclasses

    import pyarrow as pa

    from mars_ray.generation.prompts import render
    from mars_ray.stages.generate import output_cap

    xs = texts(args.texts)
    cfg = cfg_for(args, args.cache_dir)
    p = cfg.paraphrase
    caps = [output_cap(x, p.max_length_ratio, p.max_new_tokens) for x in xs]
    with TreeRss() as rss:
        t0 = time.perf_counter()
        if args.variant == "single":
            import torch

            from mars_ray.generation import GenParams
            from mars_ray.generation.local import LocalChatGenerator
            from mars_ray.models.reward import generation_dtype

            torch.set_num_threads(2)
            gen = LocalChatGenerator(
                "builtin:smollm2",
                GenParams(
                    max_new_tokens=p.max_new_tokens, num_beams=p.num_beams, no_repeat_ngram_size=p.no_repeat_ngram_size
                ),
                batch_size=1,
                dtype=generation_dtype(p.dtype),
                cache_dir=args.cache_dir,
                ragged=False,
            )
            startup = time.perf_counter() - t0
            generated = sum(
                o is not None
                for x, c in zip(xs, caps)
                for o in gen.generate([render("paraphrase", text=x)], args.n, max_new_tokens=[c])[0]
            )
            secs = time.perf_counter() - t0
        else:
            import ray

            from mars_ray.runtime import init_ray
            from mars_ray.stages.common import map_with_actors
            from mars_ray.stages.generate import ParaphraseActor, longest_first

            init_ray(cfg.resources, log_to_driver=False)
            req = longest_first(
                pa.table({"key": [f"{i}:c" for i in range(len(xs))], "text": xs, "n": [args.n] * len(xs)})
            )
            kw = dict(
                paraphrase=dataclasses.asdict(p),
                encoder={"model_ref": cfg.model.encoder, "batch_size": 64, "dtype": cfg.model.dtype},
                batch_size=p.batch_size,
                num_threads=2,
                cache_dir=cfg.model.cache_dir,
            )
            out = map_with_actors(req, ParaphraseActor, kw, resources=cfg.resources, batch_size=p.batch_size)
            generated = int(sum(out.column("gen_generated").to_pylist()))
            secs = time.perf_counter() - t0
            startup = None
            ray.shutdown()
    print(
        json.dumps(
            {
                "seconds": [secs],
                "rows": len(xs) * args.n,
                "generated": generated,
                "peak_rss_mb": rss.peak_mb,
                "load5": round(os.getloadavg()[1], 2),
                "startup_s": startup,
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)  # passed by run_variant; one run each
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--cache-dir")
    args = ap.parse_args()
    if not PKU.exists():
        print(f"skip: {PKU} is absent")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.variant:
        child(args)
        return 0
    common = [
        "--texts",
        str(args.texts),
        "--n",
        str(args.n),
        "--batch",
        str(args.batch),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        # The converted SmolLM2 is shared (a fresh cache would time the one-off GGUF conversion);
        # the generation cache starts empty.
        from mars_ray.models.resolve import cache_root

        os.symlink(cache_root() / "builtin", Path(cache) / "builtin")
        for v, label in (
            ("single", "one text at a time"),
            ("stage", "Ray Data stage (1 actor x 2 CPU)"),
            ("stage", "Ray Data stage, rerun (cache)"),
        ):
            r = run_variant(Path(__file__), v, *common, "--cache-dir", cache, reps=1)
            rows.append({"variant": label, **r})
            print(f"  done: {label} {r['seconds'][0]:.1f} s", file=sys.stderr)
    print(
        f"{args.texts} PKU texts x {args.n} paraphrase(s), SmolLM2-135M, greedy (beam search for n > 1), per-text "
        f"output cap <= {args.max_new_tokens} tokens, generation batch {args.batch}; end to end incl. model load "
        "(and Ray + actor start for the stage); one run each"
    )
    base = statistics.median(rows[0]["seconds"])
    print(
        f"{'variant':34s} {'seconds':>8s} {'outputs/s':>10s} {'vs one at a time':>17s} {'generated':>10s} "
        f"{'peak RSS MB':>12s} {'load5':>6s}"
    )
    for r in rows:
        med = statistics.median(r["seconds"])
        print(
            f"{r['variant']:34s} {med:8.1f} {r['rows'] / med:10.2f} {base / med:16.2f}x {r['generated']:10d} "
            f"{r['peak_rss_mb']:12.0f} {r['load5']:6.2f}"
        )
    # Fixed costs apart: the loop's model load, and the stage's start-up: the rerun (Ray start,
    # actor start, the gate's encoder, cache look-ups; the generator is never loaded) plus the
    # same model load.
    load = rows[0].get("startup_s")
    stage, rerun = statistics.median(rows[1]["seconds"]), statistics.median(rows[2]["seconds"])
    if load is not None and stage > rerun + load:
        fixed = rerun + load
        print(
            f"generation alone (each minus its fixed start-up: the loop's model load {load:.1f} s; the stage's "
            f"cached rerun {rerun:.1f} s + that model load): {base - load:.1f} s vs {stage - fixed:.1f} s = "
            f"{(base - load) / (stage - fixed):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
