"""The first run on a GPU: each stage on one GPU with the built-in models, its device, time and
peak GPU memory. Needs one CUDA device; finishes in a few minutes (under 10) on one GPU.

1. One MARS augment epoch (built-in demo data, ``--pairs`` training pairs, budget 2 x pairs,
   MiniLM scoring and embedding, SmolLM2 rewrites and paraphrases) with the stages in this process
   (``resources.in_process``), so their models load here and their GPU memory is measured here.
2. One training pass of the MiniLM reward model on those pairs (``train.use_gpu``, in this process).
3. ``mars-ray serve`` on the GPU, batched vs unbatched at 64 clients (``bench_serve.py --gpus 1``).

Printed: per stage, the device its models were on, its wall time and the peak GPU memory
(``torch.cuda.max_memory_allocated``); then the serving table. Without CUDA it says so and exits 2:
there is nothing to measure on a CPU machine (the CPU benchmarks are the other scripts here).

Run: ``RAY_AUTH_MODE=disabled python benchmarks/gpu_smoke.py [--pairs 200]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak(torch) -> float:
    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return gib


def _model_devices(obj, seen=None) -> set[str]:
    """Devices of the torch modules reachable from ``obj``'s attributes (a stage actor)."""
    import torch

    seen = seen if seen is not None else set()
    out: set[str] = set()
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return {str(p.device) for p in obj.parameters()} or out
    for v in getattr(obj, "__dict__", {}).values():
        if isinstance(v, torch.nn.Module) or hasattr(v, "__dict__"):
            out |= _model_devices(v, seen)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    args = ap.parse_args()
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; run it on a machine with one GPU (nothing was measured)")
        return 2
    from mars_ray.augment import run_epoch
    from mars_ray.config import Config
    from mars_ray.core import schema as S
    from mars_ray.data import read_preferences
    from mars_ray.runtime import pick_device
    from mars_ray.stages import common
    from mars_ray.train import FitSpec, fit_reward_model

    out = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    cfg = Config.load(
        overrides={
            "data.max_pairs": str(int(args.pairs / 0.8) + 1),
            "mars.budget": str(2 * args.pairs),
            "mars.strategy": "mars",
            "semantic.enabled": "true",
            "resources.in_process": "true",
            "resources.device": "cuda",
            "resources.gpus_per_actor": "1",
            "paraphrase.batch_size": "auto",
            "rewrite.batch_size": "auto",
            "train.use_gpu": "true",
            "train.num_workers": "0",
            "train.lora": "false",
            "output.dir": str(out / "run"),
            "model.cache_dir": str(out / "cache"),
        }
    )
    pairs = read_preferences(cfg.data, seed=cfg.seed).table
    train = pairs.filter(pc.equal(pairs.column(S.SPLIT), "train"))
    rows = []
    print(f"gpu_smoke: {torch.cuda.get_device_name(0)}, policy device {pick_device()}, {train.num_rows} training pairs")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run_epoch(cfg, train, reward_ref=cfg.model.reward, epoch=1, log=lambda m: None)
    devices = sorted({d for a in common._LOCAL_ACTORS.values() for d in _model_devices(a)})
    rows.append(
        ("augment epoch", devices, time.perf_counter() - t0, _peak(torch), f"{res.synthetic.num_rows} synthetic")
    )
    common.clear_local_actors()
    pq.write_table(train, out / "train.parquet")
    t0 = time.perf_counter()
    fit = fit_reward_model(cfg, FitSpec(init_model=cfg.model.reward, train_path=out / "train.parquet", val_path=out / "train.parquet",
                           run_dir=out / "ray_train", name="smoke"))  # fmt: skip
    rows.append(
        (
            "training pass",
            ["cuda (train.use_gpu)"],
            time.perf_counter() - t0,
            _peak(torch),
            f"val acc {fit.get('val_accuracy'):.3f}",
        )
    )
    print("| stage | devices | seconds | peak GPU memory | result |")
    print("|---|---|---|---|---|")
    for name, dev, s, gib, what in rows:
        print(f"| {name} | {', '.join(dev)} | {s:.0f} | {gib:.2f} GiB | {what} |")
    bench = Path(__file__).with_name("bench_serve.py")
    cmd = [sys.executable, str(bench), "--gpus", "1", "--levels", "64", "--reps", "1", "--requests", "2000",
           "--seconds", "20", "--only", "batched,unbatched", "--data", "demo"]  # fmt: skip
    print("serving (bench_serve.py on the GPU):", flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
