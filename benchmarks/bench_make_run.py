"""The first run a newcomer sees: `make run`'s command on the embedded default, from an empty cache.

Runs ``mars-ray train --output.dir DIR`` (built-in demo data and models) in a child process with a
fresh ``model.cache_dir`` (``--warm`` reuses ``~/.cache/mars_ray`` instead), sampling the peak RSS
of the whole process tree (driver, Ray and its workers). Printed: wall time, peak RSS, the final
test accuracy, each epoch's train loss (ln 2 = 0.693 is a model that did not move), and each
epoch's allocation diagnostics (ESS/N: 1 is uniform; the budget share on the lowest-margin
decile).

Run alone on the machine: ``python benchmarks/bench_make_run.py [--out runs/bench-make-run]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import TreeRss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-make-run")
    ap.add_argument("--warm", action="store_true", help="use the default model cache (built-in models, generations)")
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out)
    cache = None if args.warm else Path(tempfile.mkdtemp(prefix="mars-make-run-cache-"))
    cmd = [sys.executable, "-m", "mars_ray.cli", "train", "--output.dir", str(out), "--output.overwrite", "true"]
    if cache is not None:
        cmd += ["--model.cache_dir", str(cache)]
    cmd += extra
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    with TreeRss() as rss:
        proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    print(f"\nwall {wall:.0f} s; peak RSS of the process tree {rss.peak_mb / 1024:.2f} GiB")
    print(f"final test accuracy {rows[-1].get('test_accuracy')}")
    for r in rows:
        s = json.loads((out / "epochs" / f"{r['epoch']:03d}" / "augment_summary.json").read_text())
        d = s.get("diagnostics", {})
        print(
            f"epoch {r['epoch']}: train_loss {r.get('train_loss')}, val_accuracy {r.get('val_accuracy')}, "
            f"ESS/N {d.get('ess_ratio')}, budget share on the lowest-margin decile {d.get('budget_share_lowest_decile')}"
        )


if __name__ == "__main__":
    main()
