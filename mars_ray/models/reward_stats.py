"""The reward statistics a saved model carries in its ``config.json``: ``mean`` and ``std`` of its
rewards on the human training pairs (OpenRLHF's keys), written by ``mars-ray train`` and read by
``mars-ray serve`` for ``serve.normalize``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mars_ray.core.atomic import write_text


def reward_statistics(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    """Mean and std of every reward (chosen and rejected together), as OpenRLHF pools them."""
    r = np.concatenate([np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)])
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError("reward statistics need at least one finite reward")
    return {"mean": float(r.mean()), "std": float(r.std()), "n_pairs": int(r.size // 2)}


def store_reward_statistics(model_dir: str | os.PathLike, stats: Mapping[str, float], source: str) -> None:
    """Write ``mean`` and ``std`` (OpenRLHF's keys) and where they come from into ``config.json``."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["mean"] = float(stats["mean"])
    cfg["std"] = float(stats["std"])
    cfg["mars_ray_reward_stats"] = {"n_pairs": int(stats["n_pairs"]), "source": source}
    write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_reward_statistics(model_dir: str | os.PathLike) -> tuple[float, float] | None:
    """``(mean, std)`` from a model folder's ``config.json``, or None when it has none."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mean, std = cfg.get("mean"), cfg.get("std")
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)) and std > 0:
        return float(mean), float(std)
    return None
