"""Does the precision policy keep accuracy? ``train.precision auto`` (bf16 where native) against
``fp32`` on real HH-RLHF pairs, paired by seed, plus two checks on the same model.

For each seed, two MiniLM reward models are trained on the same pairs in the same order, one per
precision (in this process, ``train.num_workers 0``: the loop's numerics are the same on a Ray
Train worker). Each is then scored on the held-out pairs the way that precision serves it
(``model.dtype auto`` = bf16 weights where native, fp32 head; ``float32``). Reported:

- held-out accuracy of each, and the paired difference auto - fp32 per seed (the bar: within
  +-0.01 on average over >= 3 seeds);
- on each ``auto`` model: its margins scored in bf16 against the same model in fp32 (Pearson
  correlation, bar >= 0.99; and how many held-out pairs change sides);
- the ``auto`` model of the first seed served by ``mars-ray serve`` (a real HTTP server, bf16 where
  native): served rewards against the saved folder's fp32 scores (correlation, largest difference);
- training throughput (pairs per second of training steps) of each precision.

Data: the shared HH-RLHF helpful-base file read by mars_ray's reader in file order (no split):
rows [0, --train) train, the next --heldout rows are held out. Run it alone on the machine::

    RAY_AUTH_MODE=disabled python benchmarks/precision_accuracy.py [--seeds 0,1,2] [--train 800] \
        [--heldout 1000] [--passes 2] [--lr 5e-5] [--lora] [--out benchmarks/results/precision_accuracy.json]

(about 45 minutes on 2 cores with the defaults; ``--train 64 --heldout 64 --seeds 0`` is a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA

HH = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl"
THREADS = 2


def _split(n_train: int, n_heldout: int):
    from bench_train import load_split

    return load_split(HH, n_train, n_heldout)


def _cols(table) -> tuple[list[str], list[str], list[str]]:
    return tuple(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))


def _train(train_path: Path, run_dir: Path, seed: int, precision: str, a) -> dict:
    from mars_ray.config import Config
    from mars_ray.train import FitSpec, fit_reward_model

    cfg = Config.load(
        overrides={
            "seed": seed,
            "train.precision": precision,
            "train.lora": bool(a.lora),
            "train.lr": a.lr,
            "train.passes": a.passes,
            "train.batch_size": 8,
            "train.num_workers": 0,
            "model.offline": True,
        }
    )
    m = fit_reward_model(
        cfg,
        FitSpec(
            init_model="builtin:minilm",
            train_path=train_path,
            val_path=None,
            run_dir=run_dir,
            name=f"{precision}-{seed}",
        ),
    )
    return {
        "model_dir": m["model_dir"],
        "precision": m["precision"],
        "precision_reason": m["precision_reason"],
        "steps": m["steps"],
        "train_loss": m["train_loss"],
        "pairs_per_s": m["steps"] * 8 / (m["step_time_s"] * m["steps"]),
    }


def _score(model_dir: str, heldout, dtype: str) -> np.ndarray:
    from mars_ray.models.reward import load_reward_model, score_pairs

    model, tok = load_reward_model(model_dir, dtype=dtype)
    rc, rr = score_pairs(model, tok, *_cols(heldout), batch_size=32, max_prompt_tokens=512, max_response_tokens=192)
    return np.stack([rc, rr])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _served(model_dir: str, heldout) -> np.ndarray:
    """Rewards of the held-out pairs from `mars-ray serve` (defaults: model.dtype auto)."""
    port = _free_port()
    exe = Path(sys.executable).with_name("mars-ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", model_dir, "--serve.port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mars-ray serve did not come up (exit {proc.poll()})")
            time.sleep(1)
        p, c, r = _cols(heldout)
        out = []
        for side in (c, r):
            got: list[float] = []
            for s in range(0, len(p), 128):
                got += _post(url + "/score", {"prompts": p[s : s + 128], "responses": side[s : s + 128]})["rewards"]
            out.append(got)
        return np.asarray(out, dtype=np.float64)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lora", action="store_true", help="LoRA r=16 (default: full fine-tuning)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not HH.exists():
        print(f"skip: {HH} is absent")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import pyarrow.parquet as pq
    import torch

    from mars_ray.core.metrics import paired_comparison
    from mars_ray.models.precision import resolve_precision

    torch.set_num_threads(THREADS)
    train, heldout = _split(a.train, a.heldout)
    tmp = Path(tempfile.mkdtemp(prefix="precision_acc_"))
    pq.write_table(train, tmp / "train.parquet")
    seeds = [int(s) for s in a.seeds.split(",")]
    policy = resolve_precision("auto", "cpu")
    rows = []
    for seed in seeds:
        row: dict = {"seed": seed}
        for prec in ("fp32", "auto"):
            t0 = time.perf_counter()
            fit = _train(tmp / "train.parquet", tmp / "runs", seed, prec, a)
            own = _score(fit["model_dir"], heldout, "float32" if prec == "fp32" else "auto")
            row[prec] = {
                **{k: v for k, v in fit.items() if k != "model_dir"},
                "accuracy": float(np.mean(own[0] > own[1])),
                "seconds": time.perf_counter() - t0,
            }
            print(f"seed {seed} {prec}: {row[prec]}", file=sys.stderr, flush=True)
            if prec == "auto":
                fp32 = _score(fit["model_dir"], heldout, "float32")
                m_own, m32 = own[0] - own[1], fp32[0] - fp32[1]
                row["same_model"] = {
                    "margin_corr": float(np.corrcoef(m_own, m32)[0, 1]),
                    "sides_changed": int(np.sum((m_own > 0) != (m32 > 0))),
                    "max_abs_reward_diff": float(np.abs(own - fp32).max()),
                    "accuracy_fp32_scoring": float(np.mean(m32 > 0)),
                }
                if seed == seeds[0]:
                    served = _served(fit["model_dir"], heldout)
                    row["served"] = {
                        "reward_corr_vs_fp32": float(np.corrcoef(served.ravel(), fp32.ravel())[0, 1]),
                        "margin_corr_vs_fp32": float(np.corrcoef(served[0] - served[1], m32)[0, 1]),
                        "max_abs_reward_diff_vs_fp32": float(np.abs(served - fp32).max()),
                        "max_abs_reward_diff_vs_local_bf16": float(np.abs(served - own).max()),
                        "reward_sd": float(fp32.std()),
                    }
        rows.append(row)
    diffs = [r["auto"]["accuracy"] - r["fp32"]["accuracy"] for r in rows]
    summary = {
        "machine": policy.reason,
        "auto_precision": policy.compute,
        "config": vars(a) | {"out": str(a.out) if a.out else None},
        "rows": rows,
        "accuracy_diff_mean": statistics.mean(diffs),
        "paired": paired_comparison([r["auto"]["accuracy"] for r in rows], [r["fp32"]["accuracy"] for r in rows])
        if len(rows) > 1
        else None,
        "speedup_median": statistics.median(r["auto"]["pairs_per_s"] / r["fp32"]["pairs_per_s"] for r in rows),
    }
    print(f"machine: {policy.describe()}")
    print(
        f"{'seed':>4s} {'fp32 acc':>9s} {'auto acc':>9s} {'diff':>7s} {'margin r':>9s} {'flipped':>7s} "
        f"{'fp32 p/s':>8s} {'auto p/s':>8s}"
    )
    for r, d in zip(rows, diffs):
        print(
            f"{r['seed']:4d} {r['fp32']['accuracy']:9.3f} {r['auto']['accuracy']:9.3f} {d:+7.3f} "
            f"{r['same_model']['margin_corr']:9.4f} {r['same_model']['sides_changed']:7d} "
            f"{r['fp32']['pairs_per_s']:8.2f} {r['auto']['pairs_per_s']:8.2f}"
        )
    print(
        f"mean diff {summary['accuracy_diff_mean']:+.4f}; training speed-up (median) {summary['speedup_median']:.2f}x"
    )
    if "served" in rows[0]:
        print(f"served (seed {rows[0]['seed']}): {rows[0]['served']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
