"""Which rewrite prompt does the built-in rewriter (SmolLM2-135M) follow? Measured, not guessed.

For ``--pairs`` low-distance HH-RLHF pairs (the pairs MARS rewrites: distance below the mean of
the rows scanned, picked at random under ``--seed``), every template in
``benchmarks/prompt_variants/`` generates ``--attempts`` sampled rewrites (the rewrite section's
default settings: temperature 0.7, output capped at twice the source), and each output goes
through the rewrite gate (:func:`mars_ray.core.filters.rewrite_rejection`). Templates whose name
contains ``tags`` ask for the reply between ``<reply>`` markers and are parsed strictly.

Printed: per template, the share that passes the gate and the rejections by reason. Every output
is written to ``--out`` (JSONL: template, pair, raw output, extracted reply, reason, topic
similarities) for reading by hand; the test fixtures of the gate come from such a file.

Run: ``python benchmarks/measure_rewrite_prompts.py [--pairs 24] [--attempts 2]`` (about 10 min
on 2 CPU cores, SmolLM2 load included).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA

HH = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl"
VARIANTS = Path(__file__).resolve().parent / "prompt_variants"


def last_turn(prompt: str) -> str:
    """The last human turn of an HH transcript (the question the reply answers)."""
    parts = re.split(r"\n\nHuman:\s*", "\n\n" + prompt.strip())
    return parts[-1].split("\n\nAssistant:")[0].strip() or prompt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--attempts", type=int, default=2)
    ap.add_argument("--offset", type=int, default=1200, help="first HH row scanned")
    ap.add_argument("--scan", type=int, default=200, help="HH rows scanned for low-distance pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated template names (default: all)")
    ap.add_argument("--out", default="rewrite_prompts.jsonl")
    ap.add_argument("--cache-dir", default=None, help="generation cache (default: a fresh temporary one)")
    args = ap.parse_args(argv)
    if not HH.exists():
        sys.exit(f"{HH} not found: this measurement needs the real HH-RLHF file")

    import dataclasses
    import tempfile

    from mars_ray.config import RewriteConfig
    from mars_ray.core.filters import extract_reply, rewrite_rejection, template_ngrams
    from mars_ray.data.formats import parse_hh
    from mars_ray.generation.prompts import parse_prompt
    from mars_ray.stages.embed import Encoder
    from mars_ray.stages.generate import build_generator, output_cap

    lines = HH.read_text(encoding="utf-8").splitlines()[args.offset : args.offset + args.scan]
    pairs = [parse_hh(json.loads(ln)) for ln in lines]
    enc = Encoder("builtin:minilm")
    dist = enc.distances([p.chosen for p in pairs], [p.rejected for p in pairs])
    low = np.flatnonzero(dist < dist.mean())
    pick = np.random.default_rng(args.seed).choice(low, size=min(args.pairs, low.size), replace=False)
    chosen_pairs = [pairs[i] for i in sorted(pick)]
    hh_line = [args.offset + int(i) + 1 for i in sorted(pick)]  # 1-based line in the HH file

    section = dataclasses.asdict(RewriteConfig())
    cache = args.cache_dir or tempfile.mkdtemp(prefix="rewrite-prompts-")
    gen = build_generator(section, batch_size=section["batch_size"], cache_dir=cache)
    files = sorted(VARIANTS.glob("rewrite_*.txt"))
    if args.only:
        keep = set(args.only.split(","))
        files = [f for f in files if f.stem in keep]
    rows, table = [], []
    for f in files:
        tpl = parse_prompt(f.stem, f.read_text(encoding="utf-8"))
        role = "chosen" if f.stem.startswith("rewrite_chosen") else "rejected"
        delimited = "tags" in f.stem
        ngrams = template_ngrams(tpl.wording)
        msgs = [tpl.render(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected) for p in chosen_pairs]
        sources = [p.chosen if role == "chosen" else p.rejected for p in chosen_pairs]
        caps = [output_cap(s, 2.0, section["max_new_tokens"], floor=64) for s in sources]
        t0 = time.perf_counter()
        outs = gen.generate(msgs, n=args.attempts, max_new_tokens=caps, first_slot=0)
        secs = time.perf_counter() - t0
        reasons: Counter = Counter()
        recs = []
        for k, (p, src, row) in enumerate(zip(chosen_pairs, sources, outs)):
            for a, raw in enumerate(row):
                reply, why = extract_reply(raw, delimited=delimited)
                if why is None:
                    why = rewrite_rejection(
                        src,
                        reply or "",
                        context="\n".join((p.prompt, p.chosen, p.rejected)),
                        ngrams=ngrams,
                        replies="\n".join((p.chosen, p.rejected)),
                        min_length_ratio=0.2,
                        max_length_ratio=2.5,
                    )
                recs.append(
                    dict(
                        template=f.stem,
                        role=role,
                        pair=k,
                        hh_line=hh_line[k],
                        attempt=a,
                        prompt=p.prompt,
                        chosen=p.chosen,
                        rejected=p.rejected,
                        raw=raw,
                        reply=reply,
                        reason=why,
                    )
                )
                reasons[why or "pass"] += 1
        # topic similarities of passing replies and of their sources (for the off-topic threshold)
        for r in recs:
            r["source_topic_sim"] = None
        ok = [r for r in recs if r["reply"]]
        if ok:
            q = [last_turn(r["prompt"]) for r in ok]
            s_new = enc.similarity(q, [r["reply"] for r in ok])
            s_src = enc.similarity(q, [r[role] for r in ok])
            for r, a, b in zip(ok, s_new, s_src):
                r["topic_sim"], r["source_topic_sim"] = float(a), float(b)
        rows += recs
        n = sum(reasons.values())
        table.append((f.stem, n, reasons["pass"] / n, dict(reasons), secs))
        print(
            f"{f.stem}: pass {reasons['pass']}/{n} ({reasons['pass'] / n:.0%}) in {secs:.0f} s; "
            + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
            flush=True,
        )
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print("\n| template | outputs | gate pass | rejections |\n|---|---|---|---|")
    for name, n, rate, reasons, _ in table:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if k != "pass")
        print(f"| {name} | {n} | {rate:.0%} | {rej} |")
    print(f"\noutputs written to {args.out}")


if __name__ == "__main__":
    main()
