"""Pure augmentation core: allocation (Lemma 1, limits), semantic labels, pools, lineage, gates, refinement."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mars_ray.core.allocation import allocation_weights, integer_budgets, lemma1_objective, split_counts
from mars_ray.core.filters import (
    clean_generation,
    copy_similarity,
    introduced_harm,
    is_degenerate,
    paraphrase_rejection,
)
from mars_ray.core.pairs import Draw, Lineage, fit_budgets, operation_name, pool_capacity, sample_pool, synthetic_rows
from mars_ray.core.refine import RefineItem, refine_batch, refine_summary
from mars_ray.core.semantic import cosine_distance, semantic_labels

# ------------------------------------------------------------------ allocation


def test_signed_softmax_favours_low_and_negative_margins():
    m = np.array([-2.0, 0.0, 1.0, 3.0])
    q = allocation_weights(m, tau=0.5)
    assert np.isclose(q.sum(), 1) and np.all(np.diff(q) < 0)
    expected = np.exp(-0.5 * m) / np.exp(-0.5 * m).sum()
    assert np.allclose(q, expected)
    q_abs = allocation_weights(m, tau=0.5, mode="abs")
    assert q_abs[1] == q_abs.max() and np.isclose(q_abs[0], q_abs[3] * np.exp(-0.5 * (2 - 3)))


def test_lemma1_q_maximises_the_regularised_objective():
    rng = np.random.default_rng(0)
    m = rng.normal(size=20)
    for tau in (0.1, 0.5, 2.0):
        q = allocation_weights(m, tau)
        best = lemma1_objective(q, m, tau)
        # Closed form of the maximum: (1/tau) * log mean exp(-tau * m).
        assert np.isclose(best, np.log(np.mean(np.exp(-tau * m))) / tau)
        for _ in range(200):
            other = rng.dirichlet(np.ones(20) * rng.uniform(0.1, 5))
            assert lemma1_objective(other, m, tau) <= best + 1e-12


def test_tau_limits():
    m = np.array([0.3, -1.0, 2.0, -1.0, 5.0])
    assert np.allclose(allocation_weights(m, 1e-9), 1 / 5, atol=1e-8)
    q = allocation_weights(m, 1e4)
    assert np.allclose(q[[1, 3]], 0.5) and q[[0, 2, 4]].sum() < 1e-12
    b = integer_budgets(q, 101, np.random.default_rng(0))
    assert b.sum() == 101 and b[[0, 2, 4]].sum() == 0
    assert np.array_equal(allocation_weights(m, 3.0, "uniform"), np.full(5, 0.2))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=1, max_size=50), st.integers(0, 5000), st.floats(0.01, 10), st.integers(0, 9)
)
def test_integer_budgets_sum_exactly_and_round_closely(margins, budget, tau, seed):
    q = allocation_weights(np.array(margins), tau)
    b = integer_budgets(q, budget, np.random.default_rng(seed))
    assert b.sum() == budget and b.min() >= 0
    assert np.all(np.abs(b - budget * q) < 1 + 1e-9)  # largest remainder: within one unit
    assert np.array_equal(b, integer_budgets(q, budget, np.random.default_rng(seed)))
    n_plus, n_minus = split_counts(b)
    assert np.array_equal(n_plus + n_minus, b) and np.all(n_plus == b // 2)


def test_ties_broken_by_seed_deterministically():
    q = np.full(10, 0.1)
    a = integer_budgets(q, 3, np.random.default_rng(1))
    assert a.sum() == 3 and set(a) == {0, 1}
    assert np.array_equal(a, integer_budgets(q, 3, np.random.default_rng(1)))
    assert any(not np.array_equal(a, integer_budgets(q, 3, np.random.default_rng(s))) for s in range(2, 10))


def test_allocation_rejects_bad_input():
    for bad in (np.array([]), np.array([np.nan])):
        with pytest.raises(ValueError):
            allocation_weights(bad, 1.0)
    with pytest.raises(ValueError):
        allocation_weights(np.ones(3), 0.0)


# ------------------------------------------------------------------ semantic


def test_cosine_distance_and_mean_threshold():
    e1 = np.array([[1.0, 0], [1, 0], [1, 0]])
    e2 = np.array([[2.0, 0], [0, 3], [-1, 0]])
    d = cosine_distance(e1, e2)
    assert np.allclose(d, [0, 1, 2])
    low, t = semantic_labels(d)
    assert t == 1.0 and list(low) == [True, False, False]
    low, t = semantic_labels(d, threshold=1.5)
    assert list(low) == [True, True, False]


# ------------------------------------------------------------------ pools and lineage


def test_pool_capacity_always_holds_the_split_budget():
    for b in range(40):
        n_plus, n_minus = b // 2, b - b // 2
        assert pool_capacity(n_plus, n_minus) >= b


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.integers(0, 6), st.integers(0, 3), st.booleans())
def test_sample_pool_distinct_and_never_the_original(nc, nr, seed, refined):
    cap = pool_capacity(nc, nr, refined)
    k = min(cap, 5)
    draws = sample_pool(nc, nr, k, np.random.default_rng(seed), refined=refined)
    assert len(draws) == len(set(draws)) == k
    assert refined or Draw(0, 0) not in draws
    assert all(0 <= d.chosen_index <= nc and 0 <= d.rejected_index <= nr for d in draws)
    with pytest.raises(ValueError):
        sample_pool(nc, nr, cap + 1, np.random.default_rng(seed), refined=refined)


def test_fit_budgets_moves_shortfall_by_weight():
    b = np.array([5, 3, 2])
    cap = np.array([2, 10, 3])
    q = np.array([0.5, 0.2, 0.3])
    out, left = fit_budgets(b, cap, q)
    assert out.sum() == 10 and left == 0 and np.all(out <= cap) and out[0] == 2
    out, left = fit_budgets(np.array([5, 5]), np.array([1, 2]), np.array([0.5, 0.5]))
    assert list(out) == [1, 2] and left == 7


def test_synthetic_rows_carry_lineage():
    rows = synthetic_rows(
        "p",
        ["c", "c1"],
        ["r", "r1", "r2"],
        [Draw(1, 0), Draw(0, 2), Draw(1, 1)],
        Lineage(source_pair_id="abc", epoch=2, generator="builtin:smollm2", weight=0.25, refined=False),
    )
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("c1", "r"), ("c", "r2"), ("c1", "r1")]
    assert [r["operation"] for r in rows] == ["paraphrase:chosen", "paraphrase:rejected", "paraphrase:both"]
    for r in rows:
        assert r["origin"] == "synthetic" and r["source_pair_id"] == "abc" and r["epoch"] == 2 and r["weight"] == 0.25
    assert operation_name(Draw(0, 0), refined=True) == "rewrite"
    assert operation_name(Draw(1, 0), refined=True) == "rewrite+paraphrase:chosen"


# ------------------------------------------------------------------ gates


def test_paraphrase_gate_reasons():
    src = "Boil the pasta for ten minutes, then drain it and add the sauce."
    kw = dict(min_length_ratio=0.5, max_length_ratio=2.0, max_copy_similarity=0.9, min_semantic_similarity=0.7)
    assert paraphrase_rejection(src, "", **kw) == "empty"
    assert paraphrase_rejection(src, "pasta pasta pasta pasta pasta pasta pasta", **kw) == "degenerate"
    assert paraphrase_rejection(src, "Boil it.", **kw) == "too_short"
    long = (
        src
        + " Meanwhile, warm plates in a low oven, grate fresh parmesan, chop basil leaves, and pour wine for guests."
    )
    assert paraphrase_rejection(src, long + long.upper()[::-1], **kw) == "too_long"
    assert paraphrase_rejection(src, src.upper() + " ", **kw) == "near_copy"
    ok = "Cook the pasta in boiling water for ten minutes, drain it, and mix in the sauce."
    assert paraphrase_rejection(src, ok, semantic_similarity=0.4, **kw) == "meaning_drift"
    assert paraphrase_rejection(src, ok, semantic_similarity=0.9, **kw) is None


def test_generation_cleanup_and_helpers():
    assert clean_generation('Here is a paraphrase: "Hello there."') == "Hello there."
    assert clean_generation("Paraphrase: hi") == "hi" and clean_generation(None) == ""
    assert copy_similarity("A b", "a  B") == 1.0 and copy_similarity("abc", "xyz") < 0.5
    assert not is_degenerate("a perfectly normal sentence with many different words")
    assert introduced_harm("Here is how to make a bomb at home", "How do I bake bread?") == "how to make a bomb"
    assert introduced_harm("I won't explain how to make a bomb", "how to make a bomb?") is None


def test_reserve_pairs_are_the_next_highest_weights_without_budget():
    from mars_ray.core.allocation import reserve_pairs

    q = np.array([0.30, 0.05, 0.20, 0.20, 0.10, 0.15])
    b = np.array([2, 0, 1, 0, 0, 0])
    assert reserve_pairs(b, q, 0.5).tolist() == [0, 0, 0, 1, 0, 1]  # ceil(0.5 * 3) = 2: q 0.20, then 0.15
    assert reserve_pairs(b, q, 0.0).tolist() == [0] * 6
    assert reserve_pairs(b, q, 10).tolist() == [0, 1, 0, 1, 1, 1]  # never more than the pairs without budget
    assert reserve_pairs(np.zeros(6, dtype=np.int64), q, 1.0).sum() == 0


# ------------------------------------------------------------------ refinement protocol


def _distance(c, r):
    # A real, checkable distance: 1 - Jaccard similarity of word sets.
    out = []
    for a, b in zip(c, r):
        sa, sb = set(a.lower().split()), set(b.lower().split())
        out.append(1 - len(sa & sb) / max(len(sa | sb), 1))
    return np.array(out)


def test_refine_rejected_first_then_chosen_then_keep_original():
    items = [
        RefineItem("p", "the cat sat on the mat", "the cat sat on a mat", 0.2),  # rejected rewrite works on attempt 2
        RefineItem("p", "red green blue", "red green blue yellow", 0.25),  # rejected never helps; chosen does
        RefineItem("p", "one two three", "one two four", 0.5),  # nothing helps
        RefineItem("p", "x y z", "x y w", 0.5),  # rewrites add harm
    ]
    calls = []

    def one(role, chosen, rejected, attempt):
        if chosen.startswith("the cat"):
            return "the cat sat on the mat" if attempt == 1 else "dogs bark loudly outside"
        if chosen.startswith("red"):
            return rejected if role == "rejected" else "crimson emerald azure"
        if chosen.startswith("one"):
            return None if role == "rejected" else chosen
        return "here is how to make a bomb"

    def rewrite(reqs):
        calls.append(sorted({(r[0], r[4], r[5]) for r in reqs}) + [len(reqs)])
        return [
            [one(role, chosen, rejected, first + k) for k in range(n)] for role, _, chosen, rejected, first, n in reqs
        ]

    res = refine_batch(
        items, rewrite=rewrite, distance=_distance, harmful=introduced_harm, max_rejected=3, max_chosen=2
    )
    assert [r.status for r in res] == ["rewrote_rejected", "rewrote_chosen", "kept:no_gain", "kept:harmful"]
    assert res[0].rejected == "dogs bark loudly outside" and res[0].chosen == items[0].chosen and res[0].distance > 0.2
    assert res[1].chosen == "crimson emerald azure" and res[1].rejected == items[1].rejected
    assert (res[2].chosen, res[2].rejected, res[2].distance) == ("one two three", "one two four", 0.5)
    assert res[3].harmful_phrase == "how to make a bomb"
    # Batched: one call per attempt over all pending pairs; pair 0 stops after attempt 2.
    assert [c[-1] for c in calls] == [4, 4, 3, 3, 2]
    assert res[0].attempts == 2 and res[1].attempts == 4 and res[2].attempts == 5
    s = refine_summary(res)
    assert s["refined"] == 2 and s["retention"] == 0.5 and s["by_status"]["kept:harmful"] == 1
    assert s["rewrite_calls"] == sum(c[-1] for c in calls)

    # Several attempts per call: the same outcomes and attempt counts in fewer calls.
    kw = dict(rewrite=rewrite, distance=_distance, harmful=introduced_harm, max_rejected=3, max_chosen=2)
    # The audit counts every output: sequential generated only what the protocol used.
    assert res[0].audit == {"rejected:no_gain": 1, "rejected:kept": 1}
    assert s["audit"]["rewrite-chosen"] == {"no_gain": 2, "kept": 1, "harmful": 2}
    assert sum(sum(c.values()) for c in s["audit"].values()) == sum(c[-1] for c in calls)  # every output

    def same(a, b):  # outcomes equal apart from the audit (batched schedules generate more)
        return [dataclasses.replace(o, audit={}) for o in a] == [dataclasses.replace(o, audit={}) for o in b]

    calls.clear()
    by_role = refine_batch(items, schedule="by_role", **kw)
    assert same(by_role, res)
    # the third rejected attempt of pair 0 was generated too, and passed: counted, not used
    assert by_role[0].audit == {"rejected:no_gain": 1, "rejected:kept": 1, "rejected:unused": 1}
    assert calls == [[("rejected", 1, 3), 4], [("chosen", 1, 2), 3]]
    calls.clear()
    assert same(refine_batch(items, schedule="all", **kw), res)
    assert calls == [[("chosen", 1, 2), ("rejected", 1, 3), 8]]  # both roles for all four pairs at once
    with pytest.raises(ValueError, match="schedule"):
        refine_batch(items, schedule="parallel", **kw)


def test_refine_all_generation_failures_keep_originals():
    items = [RefineItem("p", "a b", "a c", 0.3)]
    for schedule in ("sequential", "all"):
        res = refine_batch(
            items,
            rewrite=lambda reqs: [[None] * r[5] for r in reqs],
            distance=_distance,
            harmful=introduced_harm,
            schedule=schedule,
        )
        assert res[0].status == "kept:generation_failed" and res[0].attempts == 10


def test_uniform_picks_follow_a_seeded_permutation_not_file_order():
    """Under uniform allocation every q is equal; the reserve, the shortfall moves and the top-up
    order must then be random under the seed (they were the first pairs of the file)."""
    from mars_ray.core.allocation import priority_order, reserve_pairs

    n = 40
    q = np.full(n, 1.0 / n)
    b = np.zeros(n, dtype=np.int64)
    b[::4] = 1  # 10 pairs with budget, 30 without
    tb = np.random.default_rng([7, 1]).permutation(n)
    order = priority_order(q, tb)
    np.testing.assert_array_equal(order, np.argsort(tb))  # all weights equal: the permutation decides
    assert not np.array_equal(order, np.arange(n))
    res = reserve_pairs(b, q, 0.5, tb)  # ceil(0.5 * 10) = 5 of the 30 without budget
    assert res.sum() == 5 and not res[b > 0].any()
    picked = [i for i in np.argsort(tb) if b[i] == 0][:5]
    assert sorted(np.flatnonzero(res).tolist()) == sorted(picked)
    assert sorted(picked) != [1, 2, 3, 5, 6]  # not the top of the file
    # the shortfall of a full pool moves to the first pairs of the permutation that have room
    cap = np.full(n, 3)
    cap[0] = 0
    out, left = fit_budgets(b, cap, q, tb)
    receiver = next(i for i in np.argsort(tb) if i != 0)
    assert left == 0 and out[0] == 0 and out[receiver] == b[receiver] + 1
    # without a tiebreak the old index order is kept (pure callers)
    np.testing.assert_array_equal(priority_order(q), np.arange(n))
    with pytest.raises(ValueError, match="tiebreak"):
        priority_order(q, tb[:3])


def test_refine_keeps_a_rewrite_only_if_the_preference_still_holds():
    """v2 §3.2: a rewrite that grows the distance but makes the rejected side preferred (here: the
    judge prefers the longer reply) is rejected and counted; the next candidate that keeps the
    label wins; with no candidate left the original pair is kept as kept:label_flip."""
    items = [
        RefineItem("p", "a full and helpful answer here", "short", 0.2),  # attempt 1 flips, attempt 2 keeps
        RefineItem("p", "ok", "no", 0.2),  # every rewrite of rejected is longer than chosen: flips
    ]
    rewrites = {
        ("short", 1): "an even longer rejected reply that now wins over it",
        ("short", 2): "bad",
        ("no", 1): "a rambling rejected reply",
        ("no", 2): "another rambling rejected reply",
    }

    def rewrite(reqs):
        return [[rewrites[(rej, first + k)] for k in range(n)] for role, _, _, rej, first, n in reqs]

    asked = []

    def by_length(prompts, chosen, rejected):
        asked.append(len(prompts))
        return np.array([len(c) - len(r) for c, r in zip(chosen, rejected)], dtype=float)

    always_far = lambda c, r: np.full(len(c), 0.9)
    for schedule in ("sequential", "all"):
        asked.clear()
        res = refine_batch(
            items,
            rewrite=rewrite,
            distance=always_far,
            harmful=introduced_harm,
            preference=by_length,
            max_rejected=2,
            max_chosen=0,
            schedule=schedule,
        )
        assert [r.status for r in res] == ["rewrote_rejected", "kept:label_flip"], schedule
        assert res[0].rejected == "bad" and res[0].label_flips == 1 and res[0].attempts == 2
        assert (res[1].chosen, res[1].rejected, res[1].label_flips) == ("ok", "no", 2)
        assert refine_summary(res)["label_flips_rejected"] == 3
        assert len(asked) == (2 if schedule == "sequential" else 1)  # one batched check per round
    # without a preference check the first, label-flipping rewrite would have been kept
    res = refine_batch(
        items, rewrite=rewrite, distance=always_far, harmful=introduced_harm, max_rejected=2, max_chosen=0
    )
    assert res[0].rejected == rewrites[("short", 1)] and res[1].status == "rewrote_rejected"


def test_margin_scale_std_makes_tau_scale_free():
    from mars_ray.core.allocation import allocation_weights

    m = np.array([-0.02, -0.005, 0.0, 0.004, 0.01, 0.03])  # fresh-head margins
    raw = allocation_weights(m, 0.5)
    assert raw.max() / raw.min() < 1.03  # raw: flat to within 3% at these margins
    q = allocation_weights(m, 0.5, scale="std")
    np.testing.assert_allclose(q, allocation_weights(100 * m, 0.5, scale="std"))  # any margin scale
    np.testing.assert_allclose(q, allocation_weights(m / m.std(), 0.5))  # = raw on standardised margins
    assert q.max() / q.min() > 1.5 and np.argmax(q) == 0
    np.testing.assert_allclose(allocation_weights(np.full(4, 0.3), 1.0, scale="std"), 0.25)  # σ = 0: uniform
    with pytest.raises(ValueError, match="scale"):
        allocation_weights(m, 0.5, scale="minmax")


def test_allocation_diagnostics():
    from mars_ray.core.allocation import allocation_diagnostics

    n = 20
    d = allocation_diagnostics(np.full(n, 1 / n), np.ones(n, dtype=np.int64))
    assert d["ess_ratio"] == pytest.approx(1.0) and d["budget_share_misranked"] is None
    m = np.linspace(-1, 1, n)  # 10 mis-ranked pairs, the lowest 2 form the lowest decile
    q = np.zeros(n)
    q[:2] = 0.5
    b = np.zeros(n, dtype=np.int64)
    b[:2] = [3, 1]
    b[15] = 4
    d = allocation_diagnostics(q, b, m)
    assert d["ess_ratio"] == pytest.approx(2 / n)  # 1 / (0.25 + 0.25) = 2 pairs' worth
    assert d["budget_share_misranked"] == pytest.approx(0.5) and d["budget_share_lowest_decile"] == pytest.approx(0.5)
    assert d["max_budget"] == 4 and d["pairs_with_budget"] == 3
    assert d["margin_mean"] == pytest.approx(0.0) and d["margin_std"] == pytest.approx(m.std())


def _draw(kept_c, kept_r, budgets, *, order=None, seed=0):
    from mars_ray.core.pairs import SyntheticDraw, draw_synthetic_pairs

    n = len(budgets)
    order = list(range(n)) if order is None else order
    ids = [f"pair{i}" for i in range(n)]
    pools = SyntheticDraw(
        pair_ids=[ids[i] for i in order],
        prompts=[f"q{i}" for i in order],
        subsets=[None] * n,
        chosen=[f"c{i}" for i in order],
        rejected=[f"r{i}" for i in order],
        kept_chosen=[kept_c[i] for i in order],
        kept_rejected=[kept_r[i] for i in order],
        budgets=np.array([budgets[i] for i in order]),
        refined=np.zeros(n, dtype=bool),
        q=np.full(n, 1 / n),
    )
    rows = draw_synthetic_pairs(pools, seed=seed, epoch=1, generator="g", refined_generator="g+r")
    by_pair: dict[str, list] = {}
    for r in rows:
        by_pair.setdefault(r["source_pair_id"], []).append((r["chosen"], r["rejected"]))
    return by_pair


def test_a_pairs_draws_do_not_depend_on_other_pools_or_the_order():
    """Pair 0's pool one paraphrase short (a gate verdict that went the other way in another run)
    changes pair 0's synthetic pairs only; the table's order changes nothing. With one random
    stream for the epoch, every pair after pair 0 would draw differently."""
    n = 12
    kept_c = [[f"c{i}-p{k}" for k in range(3)] for i in range(n)]
    kept_r = [[f"r{i}-p{k}" for k in range(3)] for i in range(n)]
    budgets = [5] * n
    base = _draw(kept_c, kept_r, budgets)
    assert sum(len(v) for v in base.values()) == 5 * n
    short = _draw([kept_c[0][:2], *kept_c[1:]], kept_r, budgets)
    assert all(short[f"pair{i}"] == base[f"pair{i}"] for i in range(1, n))
    assert _draw(kept_c, kept_r, budgets, order=list(reversed(range(n)))) == base
    other_seed = _draw(kept_c, kept_r, budgets, seed=1)
    assert other_seed != base and all(len(other_seed[k]) == 5 for k in base)
