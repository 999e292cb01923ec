"""Host-side cost of one sampled decoding step (issue 39, defect 4): choosing the next token of
160 rows over a 152k vocabulary (Qwen2.5's), the shape of a rewrite batch of 32 requests x 5
attempts with a 7B generator, with and without top-p.

Variants, each in its own process, in one run:

- ``host-multinomial``: what ``ragged_decode`` did before: softmax of the logits copied to the host,
  then one ``torch.multinomial`` per row with the row's own generator (a Python loop);
- ``device-gumbel``: the sampler now (``ragged_decode.row_sampler``): the nucleus cut as one batched
  sort and a Gumbel-max draw from each row's own generator, on the logits' device.

On this CPU machine both run on the CPU, so this measures the arithmetic and the per-row loop; on
a GPU the new sampler also avoids the per-step device-to-host copy of rows x vocabulary floats
(160 x 152k x 4 B = 97 MB per step). Prints the median seconds per step over ``--reps`` steps
and the ratio against ``host-multinomial``, with peak RSS.

Run alone on the machine: ``python benchmarks/bench_sampling.py [--rows 160 --vocab 151936]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import peak_rss_mb, run_variant, table

VARIANTS = ("host-multinomial", "device-gumbel")


def _host_multinomial(temperature: float, top_p: float, seeds: list[int]):
    """The sampler as it was before this change (kept here as the baseline)."""
    import torch

    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def choose(logits, rows):
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        toks = [int(torch.multinomial(probs[j], 1, generator=gens[r])) for j, r in enumerate(rows)]
        return torch.tensor(toks, dtype=torch.long, device=logits.device)

    return choose


def child(args) -> None:
    import torch

    from mars_ray.generation.ragged_decode import row_sampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab) * 3
    seeds = list(range(args.rows))
    make = _host_multinomial if args.variant == "host-multinomial" else row_sampler
    choose = make(1.0, args.top_p, seeds)
    rows = list(range(args.rows))
    choose(logits, rows)  # warm-up
    secs = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        choose(logits, rows)
        secs.append(time.perf_counter() - t0)
    print(json.dumps({"variant": args.variant, "seconds": secs, "rows": args.rows, "peak_rss_mb": peak_rss_mb()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return 0
    for top_p in (1.0, 0.9):
        common = ["--rows", str(args.rows), "--vocab", str(args.vocab), "--threads", str(args.threads)]
        rows = [run_variant(Path(__file__), v, *common, "--top-p", str(top_p), reps=args.reps) for v in VARIANTS]
        print(f"\n{args.rows} rows x {args.vocab} vocabulary, top_p {top_p}, {args.threads} threads (s per step)")
        print(table(rows, "host-multinomial"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
