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


def allocation_weights(margins: np.ndarray, tau: float, mode: Mode = "signed") -> np.ndarray:
    """The allocation distribution q over pairs (sums to 1).

    Raises:
        ValueError: empty or non-finite margins, tau <= 0, or an unknown mode.
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


def reserve_pairs(b: np.ndarray, q: np.ndarray, share: float) -> np.ndarray:
    """1 for the ceil(share x budget) pairs without budget that have the highest allocation weight
    (ties by index), else 0: their rejected response is paraphrased in the first round too (what
    a pair with budget 1 gets), so that when the quality gate leaves some pools short the shortfall
    can move to them (``fit_budgets``, by descending q) without another generation round."""
    out = np.zeros(len(b), dtype=np.int64)
    k = int(np.ceil(share * int(np.sum(b))))
    if k <= 0:
        return out
    order = [i for i in np.lexsort((np.arange(len(q)), -np.asarray(q, dtype=np.float64))) if b[i] == 0]
    out[order[:k]] = 1
    return out
