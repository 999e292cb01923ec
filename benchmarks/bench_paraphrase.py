"""Paraphrase generation with builtin:smollm2: the Ray Data stage vs one text at a time, and a rerun.

Real texts (short chosen responses from PKU-SafeRLHF), n paraphrases each, greedy beam search as in
the epoch. Each variant runs in a fresh process with an empty (or, for the rerun, warm) cache:

- ``one text at a time``: LocalChatGenerator.generate([request], n) per text, no cache: what a
  naive loop does. Timed from model load to the last paraphrase.
- ``Ray Data stage``: ParaphraseActor on an actor pool (1 actor x 2 CPUs) through map_with_actors,
  end to end: Ray start, actor start (SmolLM2 + MiniLM load), generation, quality gate, collection.
- ``Ray Data stage, rerun``: the same request against the cache the previous run filled: the goal is
  zero generations.

Run: ``python benchmarks/bench_paraphrase.py [--texts 16] [--n 2] [--max-new-tokens 48]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA, peak_rss_mb, run_variant, table  # noqa: E402

PKU = SHARED_DATA / "pku_saferlhf_v0test_safe_vs_unsafe_3590.jsonl"


def texts(k: int) -> list[str]:
    out, seen = [], set()
    with PKU.open(encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["chosen"].strip()
            if 60 <= len(t) <= 240 and t not in seen:
                seen.add(t)
                out.append(t)
            if len(out) == k:
                break
    return out


def cfg_for(args, cache_dir: str):
    from mars_ray.config import Config

    return Config.load(overrides={
        "paraphrase.max_new_tokens": str(args.max_new_tokens), "paraphrase.num_beams": str(args.n),
        "paraphrase.batch_size": str(args.batch), "model.cache_dir": cache_dir,
        "resources.actors": "1", "resources.cpus_per_actor": "2",
    })


def child(args) -> None:
    import dataclasses

    import pyarrow as pa

    from mars_ray.prompts import render

    xs = texts(args.texts)
    cfg = cfg_for(args, args.cache_dir)
    t0 = time.perf_counter()
    generated = 0
    if args.variant == "single":
        import torch

        from mars_ray.models.generation import GenParams
        from mars_ray.models.local_generators import LocalChatGenerator

        torch.set_num_threads(2)
        p = cfg.paraphrase
        gen = LocalChatGenerator("builtin:smollm2", GenParams(max_new_tokens=p.max_new_tokens, num_beams=p.num_beams,
                                                                no_repeat_ngram_size=p.no_repeat_ngram_size), batch_size=1)
        for x in xs:
            generated += sum(o is not None for o in gen.generate([render("paraphrase", text=x)], args.n)[0])
    else:
        import ray

        from mars_ray.runtime import init_ray
        from mars_ray.stages.common import map_with_actors
        from mars_ray.stages.generate import ParaphraseActor

        init_ray(cfg.resources)
        req = pa.table({"key": [f"{i}:c" for i in range(len(xs))], "text": xs, "n": [args.n] * len(xs)})
        kw = dict(paraphrase=dataclasses.asdict(cfg.paraphrase), encoder_ref=cfg.model.encoder, batch_size=cfg.paraphrase.batch_size,
                  encoder_batch_size=64, num_threads=2, cache_dir=cfg.model.cache_dir, seed=cfg.seed)
        out = map_with_actors(req, ParaphraseActor, kw, resources=cfg.resources, batch_size=cfg.paraphrase.batch_size)
        generated = int(sum(out.column("gen_generated").to_pylist()))
        secs = time.perf_counter() - t0
        ray.shutdown()
        print(json.dumps({"seconds": [secs], "rows": len(xs) * args.n, "generated": generated, "peak_rss_mb": peak_rss_mb()}))
        return
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": [secs], "rows": len(xs) * args.n, "generated": generated, "peak_rss_mb": peak_rss_mb()}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--cache-dir")
    args = ap.parse_args()
    if not PKU.exists():
        print(f"skip: {PKU} is absent")
        return 0
    if args.variant:
        child(args)
        return 0
    common = ["--texts", str(args.texts), "--n", str(args.n), "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for v, label in (("single", "one text at a time"), ("stage", "Ray Data stage (1 actor x 2 CPU)"),
                         ("stage", "Ray Data stage, rerun (cache)")):
            r = run_variant(Path(__file__), v, *common, "--cache-dir", cache, reps=1)
            rows.append({"variant": label, **r})
    print(f"{args.texts} texts x {args.n} paraphrases, SmolLM2-135M, {args.max_new_tokens} new tokens, beam search; "
          "end to end incl. model load (and Ray start for the stage); rows/s = paraphrases per second")
    print(table(rows, baseline="one text at a time"))
    for r in rows:
        print(f"  {r['variant']}: generated {r['generated']} paraphrases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
