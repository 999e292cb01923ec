"""Pure parts of the policy stage: verdicts, the two-order rule, win-rate statistics, prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mars_ray.config import Config
from mars_ray.core.judging import (
    combine_orders,
    completion_text,
    logit_verdict,
    parse_verdict,
    position_bias,
    to_messages,
    wilson_interval,
    winrate_summary,
)


def test_hh_transcript_becomes_alternating_turns_without_the_open_assistant_turn():
    p = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert to_messages(p) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert to_messages("Write a haiku about rain.") == [{"role": "user", "content": "Write a haiku about rain."}]
    # Text before the first turn marker is not a transcript: one user turn, kept whole.
    odd = "Preamble\n\nHuman: x\n\nAssistant:"
    assert to_messages(odd) == [{"role": "user", "content": odd.strip()}]
    # Consecutive turns of one speaker are joined.
    assert to_messages("\n\nHuman: a\n\nHuman: b\n\nAssistant:") == [{"role": "user", "content": "a\n\nb"}]


def test_completion_text_of_every_trl_shape():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("A", "A"),
        ("B", "B"),
        (" B.", "B"),
        ("**A**", "A"),
        ("[[B]]", "B"),
        ("Response A is better", "A"),
        ("The answer is B because...", "B"),
        ("Tie", "tie"),
        ("It's a draw", "tie"),
        ("Both are equal", "tie"),
        ("a good answer", None),
        ("", None),
        (None, None),
        ("I cannot decide", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_logit_verdict_and_tie_margin():
    assert logit_verdict(-0.1, -2.0) == "A"
    assert logit_verdict(-3.0, -0.5) == "B"
    assert logit_verdict(-1.0, -1.05, tie_margin=0.1) == "tie"
    assert logit_verdict(-1.0, -1.0) == "tie"


def test_two_orders_cancel_position_bias():
    # first: X shown as A; swapped: X shown as B.
    assert combine_orders("A", "B") == "win"
    assert combine_orders("B", "A") == "loss"
    assert combine_orders("A", "A") == "tie"  # a judge that always picks position A
    assert combine_orders("B", "B") == "tie"
    assert combine_orders("A", "tie") == "tie"
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders(None, "A") == "invalid" and combine_orders("A", None) == "invalid"


def test_position_biased_judge_scores_exactly_half():
    first = ["A"] * 10
    swapped = ["A"] * 10
    outcomes = [combine_orders(a, b) for a, b in zip(first, swapped)]
    s = winrate_summary(outcomes)
    assert s["win_rate"] == 0.5 and s["tie"] == 10
    b = position_bias(first, swapped)
    assert b["picked_first_position"] == 1.0 and b["orders_agree"] == 0.0


def test_winrate_summary_counts_add_up_and_ci_brackets_the_rate():
    outcomes = ["win"] * 12 + ["tie"] * 4 + ["loss"] * 6 + ["invalid"] * 2
    s = winrate_summary(outcomes, seed=1, n_boot=4000)
    assert (s["win"], s["tie"], s["loss"], s["invalid"], s["n"], s["n_prompts"]) == (12, 4, 6, 2, 22, 24)
    assert s["win_rate"] == pytest.approx((12 + 2) / 22)
    assert s["ci_low"] < s["win_rate"] < s["ci_high"]
    assert s["decisive_win_rate"] == pytest.approx(12 / 18)
    assert s["decisive_ci_low"] < 12 / 18 < s["decisive_ci_high"]
    assert math.isnan(winrate_summary(["invalid"])["win_rate"])
    with pytest.raises(ValueError, match="unknown outcomes"):
        winrate_summary(["won"])


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.1611, abs=1e-3)


def test_bootstrap_ci_covers_the_truth_most_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for k in range(100):
        outcomes = list(rng.choice(["win", "loss", "tie"], p=[0.5, 0.3, 0.2], size=60))
        s = winrate_summary(outcomes, seed=k, n_boot=2000)
        covered += s["ci_low"] <= 0.6 <= s["ci_high"]  # truth: 0.5 + 0.2 / 2
    assert covered >= 85


def test_fit_messages_drops_old_turns_then_cuts_from_the_left():
    from mars_ray.rl.align import fit_messages

    def count(msgs):
        return sum(len(m["content"].split()) + 2 for m in msgs)

    def drop(text, n):
        return " ".join(text.split()[n:])

    msgs = [
        {"role": "user", "content": "one two three four"},
        {"role": "assistant", "content": "five six"},
        {"role": "user", "content": "seven eight nine"},
    ]
    assert fit_messages(msgs, count, 100, drop) == msgs
    assert fit_messages(msgs, count, 6, drop) == [{"role": "user", "content": "seven eight nine"}]
    assert fit_messages(msgs, count, 4, drop) == [{"role": "user", "content": "eight nine"}]


def test_rl_config_problems_have_fixes():
    cfg = Config()
    for key, value, words in [
        ("rl.num_generations", 1, "group baseline"),
        ("rl.clip", 0, "0.2"),
        ("rl.kl_coef", -1, ">= 0"),
        ("rl.num_workers", 0, "Ray Train"),
        ("rl.reward_url", "localhost:8000", "http"),
    ]:
        c = Config.from_dict(cfg.to_dict())
        c.set(key, value)
        with pytest.raises(ValueError, match=words):
            c.validate()
    c = Config.from_dict(cfg.to_dict())
    c.set("rl.judge_backend", "openai")
    c.set("rl.judge_base_url", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="judge_mode=text"):
        c.validate()
    c.set("rl.judge_mode", "text")
    c.validate()


def test_reward_model_names_are_unique(tmp_path):
    from mars_ray.rl.align_compare import reward_model_names

    for name, strategy, seed in (("a", "mars", 0), ("b", "uniform", 0), ("c", "mars", 1)):
        d = tmp_path / name
        (d / "model").mkdir(parents=True)
        c = Config()
        c.mars.strategy, c.seed = strategy, seed
        c.save(d)
    assert reward_model_names([str(tmp_path / n) for n in "abc"]) == ["mars-seed0", "uniform-seed0", "mars-seed1"]
    assert reward_model_names(["x/model", "y/model", "builtin:minilm"]) == ["model-0", "model-1", "builtin_minilm"]


def test_served_reward_pickles_without_its_connection():
    import pickle

    from mars_ray.rl.rewards import RewardTarget, ServedReward

    r = ServedReward(RewardTarget(app="x"))
    r._client = object()
    r.counters.calls = 3
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._client is None and r2.counters.calls == 0 and r2.__name__ == "served_reward" and r2.target.app == "x"
