"""Bradley-Terry loss, AdaBoost-style pair weights and pairwise metrics (pure torch / NumPy).

- :func:`bt_loss`: ``sum_i w_i * -log sigma(r+_i - r-_i - m_i) / sum_i w_i`` (plain mean without
  weights). Written with ``logsigmoid`` so it is stable for large negative margins.
- :func:`adaboost_weights`: ``w_i ∝ exp(-beta * Δ_i)`` normalised to mean 1 (the AdaBoost baseline).
- :func:`pair_metrics`: accuracy (strict ``>``, ties count as wrong), margin mean/std and SNR.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["adaboost_weights", "bt_loss", "normalise_weights", "pair_metrics"]


def bt_loss(r_chosen: Any, r_rejected: Any, weights: Any = None, margin: Any = None):
    """Weighted Bradley-Terry loss, a scalar tensor.

    Args:
        r_chosen, r_rejected: rewards, shape ``(n,)`` (``(n, 1)`` is flattened).
        weights: optional non-negative per-pair weights ``(n,)``, normalised over the whole
            training set (:func:`normalise_weights`, mean 1); the result is ``sum(w * l) / n``. A
            pair's weight is therefore the same whatever batch it lands in (dividing by the batch's
            own ``sum(w)`` would only reweight pairs against their batch-mates).
        margin: optional per-pair (or scalar) margin subtracted from ``r+ - r-`` inside the sigmoid.

    Raises:
        ValueError: shape mismatch or negative weights.
    """
    import torch
    import torch.nn.functional as F

    rc = torch.as_tensor(r_chosen).reshape(-1)
    rr = torch.as_tensor(r_rejected, dtype=rc.dtype, device=rc.device).reshape(-1)
    if rc.shape != rr.shape:
        raise ValueError(f"r_chosen has {rc.numel()} values but r_rejected has {rr.numel()}")
    diff = rc - rr
    if margin is not None:
        m = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        diff = diff - (m.reshape(-1) if m.dim() > 0 else m)
    losses = -F.logsigmoid(diff.float())
    if weights is None:
        return losses.mean()
    w = torch.as_tensor(weights, dtype=torch.float32, device=losses.device).reshape(-1)
    if w.shape != losses.shape:
        raise ValueError(f"weights has {w.numel()} values for {losses.numel()} pairs")
    if bool((w < 0).any()):
        raise ValueError("weights must be >= 0")
    return (w * losses).sum() / losses.numel()


def center_penalty(r_chosen: Any, r_rejected: Any):
    """``mean((r+ + r−)²)``: TRL's reward-centering term (times ``train.center_rewards``), which
    pulls the rewards of both responses toward zero without changing their difference."""
    import torch

    rc = torch.as_tensor(r_chosen).reshape(-1)
    rr = torch.as_tensor(r_rejected, dtype=rc.dtype, device=rc.device).reshape(-1)
    return ((rc + rr).float() ** 2).mean()


def normalise_weights(weights: Any) -> np.ndarray:
    """Per-pair loss weights of a whole training set scaled to mean 1 (float64), so the weighted
    loss has the scale of the unweighted one and a pair's weight does not depend on its batch.

    Raises:
        ValueError: empty, negative, non-finite or all-zero weights.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("no weights")
    if not np.all(np.isfinite(w)) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0")
    mean = float(w.mean())
    if mean <= 0:
        raise ValueError("weights sum to 0: give at least one pair a positive weight")
    return w / mean


def adaboost_weights(margins: Any, beta: float) -> np.ndarray:
    """``w_i ∝ exp(-beta * Δ_i)`` normalised to mean 1 (float64). Computed with the max
    subtracted, so large margins do not overflow. ``beta = 0`` gives all ones.

    Raises:
        ValueError: empty or non-finite margins, or a negative / non-finite beta.
    """
    d = np.asarray(margins, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("adaboost_weights needs at least one margin")
    if not np.all(np.isfinite(d)):
        raise ValueError("margins must be finite (score the pairs first)")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta={beta} must be a finite number >= 0")
    z = -beta * d
    w = np.exp(z - z.max())
    return w / w.mean()


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def pair_metrics(r_chosen: Any, r_rejected: Any) -> dict[str, float]:
    """Pairwise metrics of rewards (arrays or tensors of equal length).

    Keys: ``accuracy`` (fraction with ``r+ > r-`` strictly; ties count as wrong), ``margin_mean``,
    ``margin_std`` (population std, ddof=0), ``snr`` = mean / std, ``chosen_mean``, ``chosen_std``,
    ``rejected_mean``, ``rejected_std``, ``n``.

    SNR when std is 0: ``+inf`` / ``-inf`` with the sign of the mean, ``nan`` when the mean is 0
    too. With no pairs every value is ``nan`` (``n`` = 0).
    """
    c, r = _np(r_chosen), _np(r_rejected)
    if c.shape != r.shape:
        raise ValueError(f"r_chosen has {c.size} values but r_rejected has {r.size}")
    n = int(c.size)
    if n == 0:
        nan = float("nan")
        keys = (
            "accuracy",
            "margin_mean",
            "margin_std",
            "snr",
            "chosen_mean",
            "chosen_std",
            "rejected_mean",
            "rejected_std",
        )
        return {**dict.fromkeys(keys, nan), "n": 0}
    d = c - r
    mean, std = float(d.mean()), float(d.std())
    if std > 0:
        snr = mean / std
    elif mean == 0:
        snr = float("nan")
    else:
        snr = math.copysign(float("inf"), mean)
    return {
        "accuracy": float(np.mean(d > 0)),
        "margin_mean": mean,
        "margin_std": std,
        "snr": snr,
        "chosen_mean": float(c.mean()),
        "chosen_std": float(c.std()),
        "rejected_mean": float(r.mean()),
        "rejected_std": float(r.std()),
        "n": n,
    }
