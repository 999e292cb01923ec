"""How many kept synthetic texts are real replies? The judged quality figure of an augment run.

Reads an output directory of ``mars-ray augment`` (``config.yaml``, ``synthetic.parquet``), finds
every generated text in the kept synthetic pairs (a side that differs from the human pair: a
paraphrase, or the rewritten reply of a refined pair) and asks a judge the audit rubric
(``mars_ray/prompts/wellformed.txt``) through ``mars-ray winrate``'s judge machinery
(``rl.judge_*`` settings: a local model in logits or text mode, or any OpenAI-compatible
endpoint). Each distinct text is judged once.

Printed: per operation (paraphrase, rewrite-rejected, rewrite-chosen) the texts judged and the
share the judge found well-formed, and the share of kept synthetic pairs whose generated texts
were all well-formed. Written: ``audit_judged.jsonl`` (every text with its verdict) and
``hand_check.jsonl`` (``--sample`` texts, rewrites first, for a person to judge: fill ``hand``).

Run: ``python benchmarks/audit_synthetic.py RUN_DIR [--judge-model builtin:smollm2]
[--judge-mode logits] [--sample 50]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


def generated_texts(synthetic: list[dict], originals: dict[str, dict]) -> list[dict]:
    """(pair, side, text, category) for every generated text of the synthetic rows, deduplicated;
    each synthetic row lists the keys of its generated texts in ``row["texts"]``."""
    seen: dict[tuple, dict] = {}
    for r in synthetic:
        o = originals[r["source_pair_id"]]
        op = r["operation"]
        r["texts"] = []
        for side in ("chosen", "rejected"):
            if r[side] == o[side]:
                continue
            para = op.endswith((f":{side}", ":both"))
            cat = "paraphrase" if para else f"rewrite-{side}"
            key = (r["source_pair_id"], side, r[side])
            seen.setdefault(
                key,
                {
                    "pair_id": key[0],
                    "side": side,
                    "text": key[2],
                    "category": cat,
                    "prompt": o["prompt"],
                    "original": o[side],
                    "operation": op,
                },
            )
            r["texts"].append(key)
    return list(seen.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--judge-backend", default="local")
    ap.add_argument("--judge-model", default="builtin:smollm2")
    ap.add_argument("--judge-mode", default="logits")
    ap.add_argument("--judge-base-url", default=None)
    ap.add_argument("--sample", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import pyarrow.parquet as pq

    from mars_ray.config import Config
    from mars_ray.core import schema as S
    from mars_ray.data import read_preferences
    from mars_ray.rl.winrate import judge_wellformed, make_judge

    run = Path(args.run_dir)
    cfg = Config.load(
        run / "config.yaml",
        overrides={
            "rl.judge_backend": args.judge_backend,
            "rl.judge_model": args.judge_model,
            "rl.judge_mode": args.judge_mode,
            **({"rl.judge_base_url": args.judge_base_url} if args.judge_base_url else {}),
        },
    )
    data = read_preferences(cfg.data, seed=cfg.seed).table
    originals = {r[S.PAIR_ID]: r for r in data.select([S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED]).to_pylist()}
    synthetic = pq.read_table(run / "synthetic.parquet").to_pylist()
    texts = generated_texts(synthetic, originals)
    if not texts:
        sys.exit(f"{run}: no generated texts in synthetic.parquet")
    t0 = time.perf_counter()
    judge = make_judge(cfg)
    verdicts = judge_wellformed(judge, [(t["prompt"], t["text"]) for t in texts])
    secs = time.perf_counter() - t0
    for t, v in zip(texts, verdicts):
        t["wellformed"] = v["wellformed"]
        t["judge"] = {k: v[k] for k in v if k != "wellformed"}
    ok = {(t["pair_id"], t["side"], t["text"]): t["wellformed"] for t in texts}
    print(
        f"judge {cfg.rl.judge_backend}:{cfg.rl.judge_model} ({cfg.rl.judge_mode}), {len(texts)} texts in {secs:.0f} s\n"
    )
    print(
        "| operation | texts judged | well-formed (of those with a verdict) | no verdict (the two letter orders disagree) |\n|---|---|---|---|"
    )
    for cat in ("paraphrase", "rewrite-rejected", "rewrite-chosen"):
        vs = [t["wellformed"] for t in texts if t["category"] == cat]
        if vs:
            good = sum(v is True for v in vs)
            none = sum(v is None for v in vs)
            share = f"{good / (len(vs) - none):.0%}" if len(vs) > none else "n/a"
            print(f"| {cat} | {len(vs)} | {good} ({share}) | {none} |")
    by_op: dict[str, Counter] = {}
    for r in synthetic:
        c = by_op.setdefault(r["operation"], Counter())
        c["pairs"] += 1
        c["all_wellformed"] += bool(r["texts"]) and all(ok[k] is True for k in r["texts"])
    print("\n| synthetic operation | pairs | every generated text well-formed |\n|---|---|---|")
    for op, c in sorted(by_op.items()):
        print(f"| {op} | {c['pairs']} | {c['all_wellformed']} ({c['all_wellformed'] / c['pairs']:.0%}) |")
    (run / "audit_judged.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts))
    rng = np.random.default_rng(args.seed)
    rew = [t for t in texts if t["category"] != "paraphrase"]
    par = [t for t in texts if t["category"] == "paraphrase"]
    k_rew = min(len(rew), args.sample // 2)
    pick = [rew[i] for i in rng.permutation(len(rew))[:k_rew]]
    pick += [par[i] for i in rng.permutation(len(par))[: args.sample - k_rew]]
    (run / "hand_check.jsonl").write_text(
        "".join(json.dumps({**t, "hand": None}, ensure_ascii=False) + "\n" for t in pick)
    )
    print(f"\nwrote {run / 'audit_judged.jsonl'} and {run / 'hand_check.jsonl'} ({len(pick)} texts to judge by hand)")


if __name__ == "__main__":
    main()
