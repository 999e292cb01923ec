"""`data prepare` throughput on the 3,590-row PKU-SafeRLHF file vs a plain json.loads + pandas loop.

Each variant runs in its own fresh process (so peak RSS is its own), repeated; the table gives
median seconds, rows/s, the speed ratio against the plain loop measured in the same run, and peak
memory. Run: ``python benchmarks/bench_data_prepare.py [--reps 5] [--file PATH]``.

Variants:
- ``plain json.loads + pandas``: read lines, json.loads each, DataFrame, write parquet. No
  validation, no quarantine, no ids, no splits: the floor for "read a jsonl into parquet".
- ``mars-ray data prepare``: the full data layer (format detection, validation with quarantine,
  dedup by content id, deterministic splits, parquet + report), without token lengths.
- ``mars-ray data prepare + lengths``: also tokenises every prompt/response (MiniLM tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA, peak_rss_mb, run_variant, table

PKU = SHARED_DATA / "pku_saferlhf_v0test_safe_vs_unsafe_3590.jsonl"


def plain(path: Path, out: Path) -> int:
    import pandas as pd

    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    df = pd.DataFrame(rows)
    df.to_parquet(out / "plain.parquet")
    return len(df)


def ours(path: Path, out: Path, lengths: bool) -> int:
    from mars_ray.config import Config
    from mars_ray.data.prepare import prepare

    cfg = Config.load(overrides={"data.path": str(path), "output.dir": str(out)})
    return prepare(cfg, with_lengths=lengths)["read"]


def child(variant: str, reps: int, path: Path) -> None:
    fn = {
        "plain": lambda o: plain(path, o),
        "ours": lambda o: ours(path, o, False),
        "ours+lengths": lambda o: ours(path, o, True),
    }[variant]
    secs = []
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        fn(Path(tmp))  # warm-up: imports, page cache, tokenizer load
        for _ in range(reps):
            t0 = time.perf_counter()
            n = fn(Path(tmp))
            secs.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": secs, "rows": n, "peak_rss_mb": peak_rss_mb()}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--file", type=Path, default=PKU)
    a = ap.parse_args()
    if not a.file.exists():
        print(f"skip: {a.file} is absent (../shared/data not beside the project)")
        return 0
    if a.variant:
        child(a.variant, a.reps, a.file)
        return 0
    names = {
        "plain": "plain json.loads + pandas",
        "ours": "mars-ray data prepare",
        "ours+lengths": "mars-ray data prepare + lengths",
    }
    rows = []
    for v, label in names.items():
        r = run_variant(Path(__file__), v, "--file", str(a.file), reps=a.reps)
        rows.append({"variant": label, **r})
    print(f"file: {a.file.name}, {rows[0]['rows']} rows, {a.reps} reps each (median), each variant in a fresh process")
    print(table(rows, baseline="plain json.loads + pandas"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
