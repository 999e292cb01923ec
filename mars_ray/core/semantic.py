"""Semantic distance between chosen and rejected responses (Algorithm 1, step 3).

d_i = 1 - <e+, e->, with unit-normalised embeddings; a pair is "low" distance (too close, a
candidate for rewriting) when d_i is below the threshold, by default the dataset mean.
"""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_distance(e_chosen: np.ndarray, e_rejected: np.ndarray) -> np.ndarray:
    """Row-wise 1 - cos(e+, e-) in [0, 2]."""
    a, b = unit_rows(e_chosen), unit_rows(e_rejected)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    return 1.0 - np.sum(a * b, axis=-1)


def semantic_labels(distances: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """(is_low, threshold): is_low[i] is True when d_i < threshold (default: the mean distance)."""
    d = np.asarray(distances, dtype=np.float64)
    if d.size == 0:
        return np.zeros(0, dtype=bool), float("nan")
    t = float(d.mean()) if threshold is None else float(threshold)
    return d < t, t
