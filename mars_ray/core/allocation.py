"""Budget allocation over preference pairs (Algorithm 1, step 2).

q_i = softmax(-tau * Delta_i) over pairs (v2, "signed"): low-margin and mis-ranked (Delta < 0)
pairs get most of the budget. v1 ("abs") uses |Delta_i|; "uniform" spreads evenly. The real-valued
shares B * q_i become whole numbers summing to exactly B by largest-remainder rounding, with ties
broken by a seeded generator so the result is deterministic.

Lemma 1: q maximises  -E_Q[Delta] - (1/tau) * KL(Q || Uniform)  over the simplex; see
:func:`lemma1_objective` (tests check it numerically).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Mode = Literal["signed", "abs", "uniform"]
Scale = Literal["raw", "std"]


def allocation_weights(margins: np.ndarray, tau: float, mode: Mode = "signed", scale: Scale = "raw") -> np.ndarray:
    """The allocation distribution q over pairs (sums to 1).

    ``scale="std"`` divides the margins by their standard deviation first, q ∝ exp(−τ·Δ/σ_Δ), so τ
    means the same at every margin scale (a fresh score head: σ ≈ 0.01; a trained model: σ ≈ 1);
    the papers use the raw margins (``"raw"``). Margins that are all equal give uniform q either way.

    Raises:
        ValueError: empty or non-finite margins, tau <= 0, or an unknown mode or scale.
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.ndim != 1 or m.size == 0:
        raise ValueError("margins must be a non-empty 1-D array")
    if not np.all(np.isfinite(m)):
        raise ValueError("margins contain NaN or infinity")
    if mode == "uniform":
        return np.full(m.size, 1.0 / m.size)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if mode == "signed":
        x = m
    elif mode == "abs":
        x = np.abs(m)
    else:
        raise ValueError(f"unknown allocation mode {mode!r}")
    if scale == "std":
        sd = float(m.std())
        x = x / sd if sd > 0 else np.zeros_like(x)
    elif scale != "raw":
        raise ValueError(f"unknown margin scale {scale!r}")
    z = -tau * x
    z -= z.max()  # stable softmax
    w = np.exp(z)
    return w / w.sum()


def integer_budgets(q: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Whole numbers b_i >= 0 with sum exactly ``budget``, as close to budget * q_i as possible.

    Largest-remainder rounding: floor every share, then give the leftover units to the largest
    fractional parts; equal fractions are ordered by a seeded random permutation.
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    q = np.asarray(q, dtype=np.float64)
    raw = budget * q / q.sum()
    base = np.floor(raw).astype(np.int64)
    left = int(budget - base.sum())
    if left > 0:
        frac = raw - base
        tiebreak = rng.permutation(q.size)
        order = np.lexsort((tiebreak, -frac))
        base[order[:left]] += 1
    return base


def split_counts(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_plus, n_minus): paraphrases of the chosen and the rejected response, n+ = floor(b/2)."""
    b = np.asarray(b, dtype=np.int64)
    n_plus = b // 2
    return n_plus, b - n_plus


def lemma1_objective(Q: np.ndarray, margins: np.ndarray, tau: float) -> float:
    """-E_Q[Delta] - (1/tau) KL(Q || U): maximised over the simplex by the signed softmax."""
    Q = np.asarray(Q, dtype=np.float64)
    n = Q.size
    nz = Q > 0
    kl = float(np.sum(Q[nz] * np.log(Q[nz] * n)))
    return float(-np.dot(Q, margins) - kl / tau)


def priority_order(q: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Pair indices by descending allocation weight; equal weights in the order of ``tiebreak``
    (a seeded permutation in an epoch, so uniform allocation does not favour the top of the file),
    by index when it is None."""
    q = np.asarray(q, dtype=np.float64)
    tb = np.arange(q.size) if tiebreak is None else np.asarray(tiebreak)
    if tb.shape != q.shape:
        raise ValueError(f"tiebreak has {tb.size} entries for {q.size} pairs")
    return np.lexsort((tb, -q))


def reserve_pairs(b: np.ndarray, q: np.ndarray, share: float, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """1 for the ceil(share x budget) pairs without budget that have the highest allocation weight
    (ties by :func:`priority_order`), else 0: their rejected response is paraphrased in the first
    round too (what a pair with budget 1 gets), so that when the quality gate leaves some pools short
    the shortfall can move to them (``fit_budgets``, by descending q) without another generation round."""
    out = np.zeros(len(b), dtype=np.int64)
    k = int(np.ceil(share * int(np.sum(b))))
    if k <= 0:
        return out
    order = [i for i in priority_order(q, tiebreak) if b[i] == 0]
    out[order[:k]] = 1
    return out


def allocation_diagnostics(
    q: np.ndarray, b: np.ndarray, margins: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """How informative an epoch's allocation was.

    - ``ess_ratio``: effective sample size of q, 1 / Σq², relative to N (1: uniform; 1/N: one pair);
    - ``max_budget``: max bᵢ; ``pairs_with_budget``;
    - ``budget_share_misranked``: share of the budget on pairs with Δ < 0 (None without margins);
    - ``budget_share_lowest_decile``: share on the 10% lowest-margin pairs (None without margins);
    - ``q_share_lowest_decile``: the allocation's mass on those pairs (0.1: uniform; None without margins);
    - ``margin_mean`` / ``margin_std`` (None without margins).
    """
    q = np.asarray(q, dtype=np.float64)
    b = np.asarray(b, dtype=np.int64)
    total = int(b.sum())
    out: dict[str, float | int | None] = {
        "ess_ratio": float(1.0 / np.sum(q * q) / q.size) if q.size else None,
        "max_budget": int(b.max()) if b.size else 0,
        "pairs_with_budget": int((b > 0).sum()),
        "budget_share_misranked": None,
        "budget_share_lowest_decile": None,
        "q_share_lowest_decile": None,
        "margin_mean": None,
        "margin_std": None,
    }
    if margins is not None and np.asarray(margins).size == q.size and q.size:
        m = np.asarray(margins, dtype=np.float64)
        k = max(1, int(np.ceil(0.1 * m.size)))
        lowest = np.argsort(m, kind="stable")[:k]
        out.update(
            budget_share_misranked=float(b[m < 0].sum() / total) if total else 0.0,
            budget_share_lowest_decile=float(b[lowest].sum() / total) if total else 0.0,
            q_share_lowest_decile=float(q[lowest].sum() / q.sum()) if q.sum() > 0 else 0.0,
            margin_mean=float(m.mean()),
            margin_std=float(m.std()),
        )
    return out
