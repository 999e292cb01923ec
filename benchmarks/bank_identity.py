"""Does the generation bank change the synthetic data? One epoch per strategy on real HH pairs with
the built-in models, once from an empty generation cache and once after `bank build` filled
another, then the synthetic pairs of the two compared (source pair, chosen, rejected).

The bank's keys make an output the same whoever generated it first, so the two agree exactly when
the generator's outputs do not depend on the batch a request was generated in. Measured here
(2 cores, Intel Xeon with native bf16; 10 HH pairs, B = 5N): float32 100 of 100 pairs identical
(uniform and mars-nosem), bfloat16 (`dtype auto` on such a CPU) 23 and 18 of 50; SmolLM2
greedy paraphrases of 48 HH replies in a batch of 32 against a shuffled batch of 8 were 48/48
identical in float32 and 38/48 in bfloat16.

Stages run in this process (the keys do not depend on Ray Data). Run:
``python benchmarks/bank_identity.py [--pairs 10] [--dtype float32] [--strategies uniform,mars-nosem]``
(about 6 minutes on 2 cores at the defaults).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA

HH = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl"


def _cfg(args, cache: Path, strategy: str):
    from mars_ray.config import Config

    return Config.load(
        overrides={
            "data.path": str(HH),
            "data.max_pairs": str(args.pairs),
            "data.val_fraction": "0",
            "data.test_fraction": "0",
            "data.seed": "0",
            "mars.strategy": strategy,
            "mars.budget": str(args.ratio * args.pairs),
            "paraphrase.dtype": args.dtype,
            "rewrite.dtype": args.dtype,
            "resources.in_process": "true",
            "model.cache_dir": str(cache),
            "output.dir": str(cache.parent / "out"),
        }
    )


def _pairs_of(result) -> set[tuple[str, str, str]]:
    t = result.synthetic
    cols = [t.column(c).to_pylist() for c in ("source_pair_id", "chosen", "rejected")]
    return set(zip(*cols))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--ratio", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--strategies", default="uniform,mars-nosem")
    args = ap.parse_args()
    if not HH.exists():
        print(f"{HH} is absent (../shared/data not beside the project)")
        return 2
    from mars_ray.augment import run_epoch
    from mars_ray.bank import build_bank
    from mars_ray.data import read_preferences

    root = Path(tempfile.mkdtemp(prefix="bank_identity_"))
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    pairs = read_preferences(_cfg(args, root / "x", strategies[0]).data, seed=0).table
    quiet = lambda m: None
    t0 = time.perf_counter()
    build_bank(_cfg(args, root / "bank", strategies[0]), pairs, log=quiet)
    print(f"bank build: {time.perf_counter() - t0:.0f} s for {pairs.num_rows} pairs ({args.dtype})")
    print("| strategy | synthetic pairs | identical | no-bank epoch: s, generated | bank epoch: s, generated |")
    print("|---|---|---|---|---|")
    for strategy in strategies:
        runs = []
        for cache in (root / f"empty-{strategy}", root / "bank"):
            t = time.perf_counter()
            res = run_epoch(_cfg(args, cache, strategy), pairs, reward_ref="builtin:minilm", epoch=1, log=quiet)
            runs.append((res, time.perf_counter() - t))
        (a, ta), (b, tb) = runs
        same = len(_pairs_of(a) & _pairs_of(b))
        print(
            f"| {strategy} | {a.synthetic.num_rows} / {b.synthetic.num_rows} | {same} | "
            f"{ta:.0f}, {a.summary['bank']['generated']} | {tb:.0f}, {b.summary['bank']['generated']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
