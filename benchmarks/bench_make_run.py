"""The first run a newcomer sees: `make run`'s command on the embedded default, from an empty cache.

Runs ``mars-ray train --output.dir DIR`` (built-in demo data and models) in a child process with a
fresh ``model.cache_dir`` that holds only what ``make install`` prepares (the built-in SmolLM2
converted from its GGUF, linked from the default cache): no generations, no warm-up model
(``--warm`` reuses ``~/.cache/mars_ray`` instead). It samples the peak RSS of the whole process
tree (driver, Ray and its workers). Printed: wall time, peak RSS, the final
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
    if cache is not None:
        from mars_ray.models.resolve import cache_root, resolve_model

        resolve_model("builtin:smollm2")  # set-up (make install does it): a no-op once converted
        (cache / "builtin").symlink_to(cache_root() / "builtin", target_is_directory=True)
    cmd = [sys.executable, "-m", "mars_ray.cli", "train", "--output.dir", str(out), "--output.overwrite", "true"]
    if cache is not None:
        cmd += ["--model.cache_dir", str(cache)]
    cmd += extra
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    with TreeRss(every=0.25, pss=True) as rss:
        proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    print(
        f"\nwall {wall:.0f} s; peak memory of the process tree: {rss.peak_pss / 2**30:.2f} GiB PSS "
        f"(shared pages counted once), {rss.peak_mb / 1024:.2f} GiB summed RSS"
    )
    print("  at the peak: " + ", ".join(f"{name} {b / 2**20:.0f} MiB" for name, b in rss.peak_detail[:8]))
    summary = json.loads((out / "summary.json").read_text())
    base = summary.get("base") or {}
    print(f"test accuracy {base.get('test_accuracy')} (base model) -> {rows[-1].get('test_accuracy')} (final)")
    for r in rows:
        s = json.loads((out / "epochs" / f"{r['epoch']:03d}" / "augment_summary.json").read_text())
        d = s.get("diagnostics", {})
        print(
            f"epoch {r['epoch']}: train_loss {r.get('train_loss')}, val_accuracy {r.get('val_accuracy')}, "
            f"ESS/N {d.get('ess_ratio')}, q share of the lowest-margin decile {d.get('q_share_lowest_decile')}, "
            f"budget share {d.get('budget_share_lowest_decile')}; augment {r.get('augment_s')} s, train {r.get('train_s')} s"
        )


if __name__ == "__main__":
    main()
