"""CPU-side costs of the shared-storage generation cache (``ShardedCache``, issue 39, part 4) that
a GPU run pays too: a fresh reader merging a bank of ``--entries`` entries spread over ``--shards``
shard files, and a lookup that misses once every shard has been read.

Variants, in one run, on the same shard files (a local disk: on NFS every open and read costs more):

- ``reread-all``: a miss as it was before, every shard globbed, opened and read from its offset;
- ``grown-only``: a miss now, one directory listing with sizes; only shards that grew are opened.

Prints the merge time, the median time per miss over ``--reps`` misses and the ratio, with peak RSS.

Run alone on the machine: ``python benchmarks/bench_shard_cache.py [--entries 100000 --shards 16]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import peak_rss_mb


def _reread_all(cache) -> None:
    """The refresh before this change: every shard opened and read from its offset on every miss."""
    for f in sorted(cache.dir.glob("shard-*.jsonl")):
        start = cache._offsets.get(f.name, 0)
        with open(f, "rb") as fh:
            fh.seek(start)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        for raw in data[:end].splitlines():
            row = cache._parse(raw)
            if row is not None:
                cache._index.setdefault(row[0], (row[1], row[2]))
        cache._offsets[f.name] = start + end


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--chars", type=int, default=400, help="characters per cached text")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    from mars_ray.generation.cache import ShardedCache, text_digest

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        per = args.entries // args.shards
        for s in range(args.shards):
            with open(root / f"shard-bench-{s}-00000000.jsonl", "w", encoding="utf-8") as f:
                for i in range(per):
                    text = f"paraphrase {s}-{i} " + "x" * args.chars
                    f.write(json.dumps({"k": f"{s}-{i}", "t": text, "d": text_digest(text), "m": "bench"}) + "\n")
        mb = sum(p.stat().st_size for p in root.iterdir()) / 2**20
        reader = ShardedCache(root)
        t0 = time.perf_counter()
        assert reader.get_many(["0-0"]) == {"0-0": reader._index["0-0"][0]}
        merge_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {"reread-all": [], "grown-only": []}
        for _ in range(args.reps):
            t = time.perf_counter()
            _reread_all(reader)
            times["reread-all"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert reader.get_many(["missing"]) == {}
            times["grown-only"].append(time.perf_counter() - t)
        before, after = (statistics.median(times[k]) for k in ("reread-all", "grown-only"))
        print(
            f"{len(reader._index):,} entries in {args.shards} shards ({mb:.0f} MB): a fresh reader merges them in "
            f"{merge_s:.2f} s"
        )
        print(f"{'variant':12s} {'median s per miss':>18s}")
        print(f"{'reread-all':12s} {before:18.6f}")
        print(f"{'grown-only':12s} {after:18.6f}   {before / after:.1f}x less")
        print(f"peak RSS {peak_rss_mb():.0f} MB (the merged index of every entry, in each process that reads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
