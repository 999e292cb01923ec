"""Evaluation arithmetic on hand-made numbers (no models, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mars_ray.core.metrics import (
    HEP,
    SECTIONS,
    best_of_n_result,
    curvature_bins,
    length_buckets,
    paired_comparison,
    rewardbench2_scores,
    rewardbench_sections,
    sigmoid,
    subset_accuracy,
    ties_score,
)


def test_subset_accuracy_counts_strict_wins_per_subset():
    res = subset_accuracy([True, False, True, True], ["a", "a", "b", "b"])
    assert res == {"a": {"accuracy": 0.5, "n": 2}, "b": {"accuracy": 1.0, "n": 2}}
    with pytest.raises(ValueError, match="3 results but 2"):
        subset_accuracy([True, True, False], ["a", "b"])


def test_sections_weigh_subsets_by_rewardbench_counts_and_math_like_all_code():
    per = {
        "alpacaeval-easy": {"accuracy": 1.0, "n": 100},
        "mt-bench-med": {"accuracy": 0.5, "n": 300},  # the data's n does not matter: RewardBench's 40 does
        "llmbar-natural": {"accuracy": 0.6, "n": 100},
        "donotanswer": {"accuracy": 0.2, "n": 10},
        "xstest-should-respond": {"accuracy": 0.8, "n": 30},
        "math-prm": {"accuracy": 0.9, "n": 447},
        "hep-cpp": {"accuracy": 0.5, "n": 164},
        "hep-go": {"accuracy": 0.7, "n": 10},
        "my-own-subset": {"accuracy": 0.0, "n": 5},
    }
    r = rewardbench_sections(per)
    s = r["sections"]
    assert s["Chat"] == pytest.approx((1.0 * 100 + 0.5 * 40) / 140)
    assert s["Chat Hard"] == pytest.approx(0.6)
    assert s["Safety"] == pytest.approx((0.2 * 136 + 0.8 * 154) / (136 + 154))
    assert s["Reasoning"] == pytest.approx((0.9 * 984 + 0.5 * 164 + 0.7 * 164) / (984 + 2 * 164))
    assert r["average"] == pytest.approx(np.mean(list(s.values())))
    assert r["covered"] == ["Chat", "Chat Hard", "Safety", "Reasoning"]
    assert r["complete"] == {"Chat": False, "Chat Hard": False, "Safety": False, "Reasoning": False}
    assert r["unknown_subsets"] == ["my-own-subset"]
    # the complete Reasoning section: math-prm half, the six hep-* subsets the other half
    full = {"math-prm": {"accuracy": 0.9, "n": 447}, **{h: {"accuracy": 0.3, "n": 164} for h in HEP}}
    assert rewardbench_sections(full)["sections"]["Reasoning"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)


def test_sections_cover_only_what_the_data_has():
    per = {s: {"accuracy": 0.5, "n": 4} for s in SECTIONS["Chat Hard"]}
    r = rewardbench_sections(per)
    assert r["covered"] == ["Chat Hard"] and r["complete"] == {"Chat Hard": True}
    assert r["average"] == pytest.approx(0.5)
    r = rewardbench_sections({"hep-go": {"accuracy": 0.2, "n": 3}, "hep-rust": {"accuracy": 0.6, "n": 50}})
    assert r["sections"]["Reasoning"] == pytest.approx(0.4)  # equal counts: the plain mean
    assert math.isnan(rewardbench_sections({})["average"])


def test_best_of_n_counts_ties_at_the_top_as_fractions():
    assert best_of_n_result([2.0, 1.0, 0.5, 1.9]) == 1.0
    assert best_of_n_result([2.0, 2.0, 0.5, 1.9]) == 0.5
    assert best_of_n_result([2.0, 2.0, 2.0, 2.0]) == 0.25
    assert best_of_n_result([1.0, 3.0, 0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        best_of_n_result([1.0])


def test_ties_score_by_hand():
    rows = [
        # prompt 1: tied (3 correct, 2 wrong), all correct above the wrong ones; reference too
        ("tied:1", 3, [5.0, 4.0, 4.5, 1.0, 2.0]),
        ("ref:1", 1, [3.0, 2.5, 1.0]),
        # prompt 2: tied ranks a wrong answer above a correct one; reference right
        ("tied:2", 2, [1.0, 3.0, 2.0, 0.0]),
        ("ref:2", 1, [4.0, 0.0]),
    ]
    t = ties_score(rows)
    # per prompt: tied (accurate, spread, gap), ref (accurate, gap)
    # 1: spread 1.0, gap 4.0 - 2.0 = 2.0 (accurate); ref gap 0.5; hard = min(0.5, 2.0) = 0.5
    # 2: spread 2.0, gap 1.0 - 2.0 = -1.0 (not accurate); ref gap 4.0; hard = min(4.0, -1.0) = -1.0
    assert t["tied_accuracy"] == 0.5 and t["ref_accuracy"] == 1.0
    assert t["correctness_preferred"] == 0.5  # 2.0 > 1.0 yes; -1.0 > 2.0 no
    assert t["correctness_preferred_hard"] == 0.0  # 0.5 > 1.0 no; -1.0 > 2.0 no
    margin = (math.tanh(0.5 / 1.0 - 1) + math.tanh(-1.0 / 2.0 - 1)) / 2
    assert t["margin_score"] == pytest.approx(margin)
    assert t["score"] == pytest.approx(0.3 * 0.5 + 0.3 * 1.0 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * margin)
    with pytest.raises(ValueError, match="ref:<prompt id>"):
        ties_score([("x", 1, [1.0, 0.0])])


def test_rewardbench2_scores_subsets_and_average():
    rows = [
        {"subset": "Focus", "id": "a", "num_correct": 1, "scores": [2.0, 1.0, 0.0, 1.5]},
        {"subset": "Focus", "id": "b", "num_correct": 1, "scores": [1.0, 2.0, 0.0, 1.5]},
        {"subset": "Math", "id": "c", "num_correct": 1, "scores": [3.0, 3.0, 0.0, 1.0]},
        {"subset": "Ties", "id": "tied:7", "num_correct": 2, "scores": [2.0, 2.5, 0.0]},
        {"subset": "Ties", "id": "ref:7", "num_correct": 1, "scores": [2.0, 0.0]},
    ]
    r = rewardbench2_scores(rows)
    assert r["subsets"]["Focus"]["score"] == 0.5 and r["subsets"]["Math"]["score"] == 0.5
    assert r["subsets"]["Ties"]["score"] == pytest.approx(
        ties_score([("tied:7", 2, [2.0, 2.5, 0.0]), ("ref:7", 1, [2.0, 0.0])])["score"]
    )
    assert r["average"] == pytest.approx(np.mean([0.5, 0.5, r["subsets"]["Ties"]["score"]]))


def test_length_buckets():
    out = length_buckets([True, False, True, True], [10, 100, 120, 600], edges=(64, 512))
    assert out == [
        {"tokens": "0-63", "n": 1, "accuracy": 1.0},
        {"tokens": "64-511", "n": 2, "accuracy": 0.5},
        {"tokens": ">=512", "n": 1, "accuracy": 1.0},
    ]


def test_curvature_on_a_linear_model_matches_the_closed_form():
    # Linear reward r(x, y) = w . phi(y) with w = (1, 1): psi = phi+ - phi- and margin = w . psi.
    # Pairs alternate psi = (a, 0) and (0, a), so each bin's Fisher is diagonal with entries
    # (1/|B|) sum over that half of c(a) a^2: its smallest eigenvalue is the smaller of the two.
    a = np.array([0.1, -0.2, 0.4, 0.5, -1.0, 1.5, 2.0, -3.0, 4.0, 6.0])
    psi = np.zeros((a.size, 2))
    psi[0::2, 0] = a[0::2]
    psi[1::2, 1] = a[1::2]
    margins = psi @ np.array([1.0, 1.0])
    assert np.allclose(margins, a)
    out = curvature_bins(margins, psi, bins=5)
    order = np.argsort(np.abs(a), kind="stable")
    for k, idx in enumerate(np.array_split(order, 5)):
        c = sigmoid(a[idx]) * (1 - sigmoid(a[idx]))
        diag = [sum(c[j] * a[i] ** 2 for j, i in enumerate(idx) if i % 2 == d) / len(idx) for d in (0, 1)]
        assert out[k]["n"] == 2
        assert out[k]["mean_c"] == pytest.approx(c.mean())
        assert out[k]["min_eig"] == pytest.approx(min(diag), abs=1e-12)
        assert out[k]["max_eig"] == pytest.approx(max(diag))
    # c(Δ) falls as |Δ| grows: the theory the diagnostic checks.
    assert all(x["mean_c"] > y["mean_c"] for x, y in zip(out, out[1:]))
    # Unit-norm features: the bin-averaged Fisher's eigenvalues fall with |Δ| as well.
    rng = np.random.default_rng(0)
    u = rng.normal(size=(400, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    m = np.linspace(-8, 8, 400)
    out = curvature_bins(m, u, bins=4)
    assert all(x["min_eig"] > y["min_eig"] for x, y in zip(out, out[1:]))
    assert out[0]["abs_margin_lo"] == pytest.approx(0.02, abs=0.01) and out[-1]["abs_margin_hi"] == 8
    with pytest.raises(ValueError, match="psi must be"):
        curvature_bins(m, u[:10], bins=4)


def test_paired_comparison_matches_the_t_distribution():
    # Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, df 2 -> p = 0.07418.
    r = paired_comparison([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r["mean_diff"] == pytest.approx(2.0) and r["std_diff"] == pytest.approx(1.0)
    assert r["t"] == pytest.approx(3.4641016, rel=1e-6)
    assert r["p_value"] == pytest.approx(0.074180, abs=2e-5)
    # t-interval: 2 ± t(0.975, 2) · 1/√3 = 2 ± 4.302653 · 0.57735; p > 0.05, so it holds 0
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert r["ci_low"] < 0 < r["ci_high"]
    # df 9, t = 2.262157 is the 97.5% quantile: p = 0.05.
    x = np.array([0.0] * 9 + [1.0])
    d = 2.262157 * x.std(ddof=1) / math.sqrt(10)
    r = paired_comparison(x - x.mean() + d, np.zeros(10))
    assert r["p_value"] == pytest.approx(0.05, abs=1e-5)
    assert r["ci_low"] == pytest.approx(0.0, abs=1e-6)  # the interval touches 0 exactly at p = 0.05
    # Identical results: no difference, no test.
    r = paired_comparison([0.5, 0.5], [0.5, 0.5])
    assert r["mean_diff"] == 0 and math.isnan(r["p_value"])


def test_interval_agrees_with_the_test_where_a_seed_bootstrap_did_not():
    """Three seeds with differences 0.01, 0.02, 0.05: p = 0.157, so a 95% interval must hold 0 (the
    percentile bootstrap over the three seeds gave [0.01, 0.05], excluding it)."""
    r = paired_comparison([0.61, 0.62, 0.65], [0.60, 0.60, 0.60])
    assert r["p_value"] > 0.05 and r["ci_low"] < 0 < r["ci_high"]
    for diffs in ([0.03, 0.031, 0.029, 0.032], [0.01, -0.02, 0.005]):
        r = paired_comparison(np.array(diffs), np.zeros(len(diffs)))
        assert (r["p_value"] < 0.05) == (r["ci_low"] > 0 or r["ci_high"] < 0)


def test_pair_bootstrap_resamples_pairs_for_both_arms_together():
    from mars_ray.core.metrics import pair_bootstrap

    rng = np.random.default_rng(0)
    b = rng.random((3, 400)) < 0.6
    a = b.copy()
    a[:, :40] = True  # arm a also gets 40 pairs right that b may miss: a real, small gain
    r = pair_bootstrap(a, b, n_boot=2000, seed=1)
    gain = (a.mean(axis=1) - b.mean(axis=1)).mean()
    assert r["mean_diff"] == pytest.approx(gain) and r["n_pairs"] == 400 and r["n_seeds"] == 3
    assert 0 < r["ci_low"] < gain < r["ci_high"]
    same = pair_bootstrap(b, b, n_boot=500)
    assert same["ci_low"] == same["ci_high"] == 0.0  # paired: identical arms differ on no resample
    with pytest.raises(ValueError):
        pair_bootstrap(a[:, :10], b)
