"""Evaluation arithmetic without models: RewardBench sections, length buckets, the curvature
diagnostic and paired statistics across seeds.

Everything here takes plain arrays (rewards, margins, features) so it is tested on hand-made
numbers; ``mars_ray.evaluate`` produces those arrays from a reward model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# RewardBench's sections (the filtered split): section -> its subsets.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
HEP = ("hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust")
SUBSET_SECTION = {s: sec for sec, subs in SECTIONS.items() for s in subs}


def subset_accuracy(correct: Sequence[bool] | np.ndarray, subsets: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per subset: ``{"accuracy", "n"}`` from per-pair correctness (strict r+ > r-)."""
    ok = np.asarray(correct, dtype=bool)
    if ok.shape[0] != len(subsets):
        raise ValueError(f"{ok.shape[0]} results but {len(subsets)} subset labels")
    out: dict[str, dict[str, float]] = {}
    for name in sorted({str(s) for s in subsets}):
        mask = np.array([str(s) == name for s in subsets])
        out[name] = {"accuracy": float(ok[mask].mean()), "n": int(mask.sum())}
    return out


def rewardbench_sections(per_subset: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """RewardBench scoring from per-subset ``{"accuracy", "n"}``.

    A section is the example-weighted mean of the subsets of it that are present; Reasoning is
    0.5 * acc(math-prm) + 0.5 * (unweighted mean of the hep-* subsets present) when both parts are
    present, else whichever part is. ``average`` is the mean of the sections covered; ``covered``
    lists them, ``complete`` says whether a section had all its subsets, ``unknown_subsets`` the
    subsets that belong to no section (they do not count).
    """
    sections: dict[str, float] = {}
    complete: dict[str, bool] = {}
    for sec, subs in SECTIONS.items():
        present = [s for s in subs if s in per_subset and per_subset[s]["n"] > 0]
        if not present:
            continue
        complete[sec] = len(present) == len(subs)
        if sec == "Reasoning":
            parts = []
            if "math-prm" in present:
                parts.append(float(per_subset["math-prm"]["accuracy"]))
            hep = [float(per_subset[s]["accuracy"]) for s in HEP if s in present]
            if hep:
                parts.append(float(np.mean(hep)))
            sections[sec] = float(np.mean(parts))
        else:
            n = np.array([per_subset[s]["n"] for s in present], dtype=float)
            acc = np.array([per_subset[s]["accuracy"] for s in present], dtype=float)
            sections[sec] = float((acc * n).sum() / n.sum())
    return {
        "sections": sections,
        "average": float(np.mean(list(sections.values()))) if sections else float("nan"),
        "covered": list(sections),
        "complete": complete,
        "unknown_subsets": sorted(s for s in per_subset if s not in SUBSET_SECTION),
    }


def length_buckets(
    correct: Sequence[bool] | np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    edges: Sequence[int] = (64, 128, 256, 512),
) -> list[dict[str, Any]]:
    """Accuracy by the pair's length (tokens of its longer sequence) in buckets split at ``edges``."""
    ok = np.asarray(correct, dtype=bool)
    ln = np.asarray(lengths)
    bounds = [0, *edges, None]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = (ln >= lo) & (ln < hi if hi is not None else True)
        if mask.any():
            out.append(
                {
                    "tokens": f"{lo}-{hi - 1}" if hi is not None else f">={lo}",
                    "n": int(mask.sum()),
                    "accuracy": float(ok[mask].mean()),
                }
            )
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def curvature_bins(margins: np.ndarray, psi: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    """The curvature diagnostic (MARS v1, Fig. 5).

    Pairs sorted by |Δ| into ``bins`` equal-count bins; per bin the mean of c(Δ) = σ(Δ)(1−σ(Δ))
    and the smallest eigenvalue of the bin-averaged empirical Fisher (1/|B|) Σ c(Δ_i) ψ_i ψ_iᵀ,
    ψ_i = φ(x, y+) − φ(x, y−) (features of the reward model's last layer). ``psi`` is (n, k).
    """
    m = np.asarray(margins, dtype=np.float64)
    psi = np.asarray(psi, dtype=np.float64)
    if psi.ndim != 2 or psi.shape[0] != m.shape[0]:
        raise ValueError(f"psi must be (n, k) with n = {m.shape[0]} margins, got {psi.shape}")
    if not 1 <= bins <= max(1, m.shape[0]):
        raise ValueError(f"bins must be between 1 and the number of pairs ({m.shape[0]}), got {bins}")
    order = np.argsort(np.abs(m), kind="stable")
    out = []
    for k, idx in enumerate(np.array_split(order, bins)):
        c = sigmoid(m[idx]) * (1.0 - sigmoid(m[idx]))
        fisher = (psi[idx] * c[:, None]).T @ psi[idx] / len(idx)
        eig = np.linalg.eigvalsh(fisher)
        out.append(
            {
                "bin": k,
                "n": len(idx),
                "abs_margin_lo": float(np.abs(m[idx]).min()),
                "abs_margin_hi": float(np.abs(m[idx]).max()),
                "mean_c": float(c.mean()),
                "min_eig": float(eig[0]),
                "max_eig": float(eig[-1]),
            }
        )
    return out


def paired_comparison(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
    """Paired difference a − b across seeds: mean, std, a two-sided paired t-test (scipy) and the
    t-interval of the mean difference at ``level``, which agrees with the test (it excludes 0
    exactly when p < 1 − level). A percentile bootstrap over a handful of seeds is narrower than
    that and is not used; :func:`pair_bootstrap` resamples held-out pairs instead."""
    from scipy.stats import t as student_t
    from scipy.stats import ttest_1samp

    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = x.size
    if n == 0:
        raise ValueError("no paired values")
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    lo = hi = float("nan")
    if n > 1 and sd > 0:
        res = ttest_1samp(x, 0.0)  # the paired t-test: a one-sample test on the differences
        t, p = float(res.statistic), float(res.pvalue)
        half = float(student_t.ppf(1 - (1 - level) / 2, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    elif n > 1:
        t, p = (float("nan"), float("nan")) if mean == 0 else (math.copysign(float("inf"), mean), 0.0)
        lo = hi = mean
    else:
        t, p = float("nan"), float("nan")
    return {
        "mean_diff": mean,
        "std_diff": sd,
        "n": int(n),
        "t": float(t),
        "p_value": float(p),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "ci": "t",
        "level": float(level),
    }


def pair_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, *, n_boot: int = 5000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Pair-level paired bootstrap of an accuracy difference (the secondary analysis).

    ``correct_a``/``correct_b``: ``(seeds, pairs)`` booleans, whether arm a / b ranked each held-out
    pair right, the same pairs in the same columns for both arms and every seed. Each replicate
    resamples pairs (columns) with replacement, the same columns for both arms, and takes the
    difference of accuracies averaged over seeds; the interval is the percentile interval.

    Raises:
        ValueError: shapes differ or there are no pairs.
    """
    ca = np.atleast_2d(np.asarray(correct_a, dtype=np.float64))
    cb = np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if ca.shape != cb.shape or ca.shape[1] == 0:
        raise ValueError(f"need equal (seeds, pairs) shapes with pairs > 0, got {ca.shape} and {cb.shape}")
    d = (ca - cb).mean(axis=0)  # per pair: the difference averaged over seeds
    rng = np.random.default_rng(seed)
    m = d.size
    boot = np.empty(n_boot)
    for k in range(0, n_boot, 500):  # chunks bound the (replicates, pairs) index matrix
        idx = rng.integers(0, m, size=(min(500, n_boot - k), m))
        boot[k : k + idx.shape[0]] = d[idx].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {
        "mean_diff": float(d.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_pairs": int(m),
        "n_seeds": int(ca.shape[0]),
        "n_boot": int(n_boot),
        "level": float(level),
    }
