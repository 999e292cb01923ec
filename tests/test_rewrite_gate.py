"""The rewrite gate on real SmolLM2-135M outputs and on made-up edge cases (no Ray, no LLM).

``tests/data/smollm2_rewrites.jsonl`` holds outputs of the built-in rewriter for low-distance
HH-RLHF pairs, written by ``benchmarks/measure_rewrite_prompts.py``, each with the template it came
from (``benchmarks/prompt_variants/``) and the line of its pair in the shared HH-RLHF file (the
pairs themselves stay there; these tests skip without it): the instruction echoed after a reply,
a reply that is the prompt, the transcript continued, talk about "the better reply", a reply cut
off, missing markers, an off-topic reply, and well-formed rewrites that must pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mars_ray.core.filters import (
    echoes_template,
    extract_reply,
    judge_rewrite,
    last_human_turn,
    looks_truncated,
    rewrite_rejection,
    template_ngrams,
)
from mars_ray.generation.prompts import load_prompt, parse_prompt

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = [json.loads(x) for x in (ROOT / "tests/data/smollm2_rewrites.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hh_lines() -> list[str]:
    from conftest import HH, shared_file

    return shared_file(HH).read_text(encoding="utf-8").splitlines()


def _with_pair(fx, lines):
    from mars_ray.data.formats import parse_hh

    p = parse_hh(json.loads(lines[fx["hh_line"] - 1]))
    return {**fx, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}


def _wording(template: str) -> str:
    path = ROOT / "benchmarks/prompt_variants" / f"{template}.txt"
    return parse_prompt(template, path.read_text(encoding="utf-8")).wording


def _verdict(fx, min_topic=None, sim=None):
    reply, why = judge_rewrite(
        fx["raw"],
        role=fx["role"],
        prompt=fx["prompt"],
        chosen=fx["chosen"],
        rejected=fx["rejected"],
        template_wording=_wording(fx["template"]),
        min_length_ratio=0.2,
        max_length_ratio=2.5,
    )
    if why is None and min_topic is not None and sim is not None and sim < min_topic:
        return None, "off_topic"
    return reply, why


@pytest.mark.parametrize(
    "fx", [f for f in FIXTURES if f["expected"] not in (None, "off_topic")], ids=lambda f: f["case"]
)
def test_real_debris_is_rejected_with_its_reason(fx, hh_lines):
    reply, why = _verdict(_with_pair(fx, hh_lines))
    assert (reply, why) == (None, fx["expected"]), fx["raw"][:200]


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f["expected"] is None], ids=lambda f: f["case"])
def test_real_well_formed_rewrites_pass(fx, hh_lines):
    reply, why = _verdict(_with_pair(fx, hh_lines))
    assert why is None and reply, fx["raw"][:200]
    assert not reply.lower().startswith(("here is", "rewritten text"))  # lead-in labels are stripped


def test_real_off_topic_reply_is_rejected_by_the_topic_floor(hh_lines):
    """ "You're not allowed for this." to a question about a car's rollover risk passes every string
    check; its MiniLM similarity to the question is below the configured floor."""
    from mars_ray.config import RewriteConfig
    from mars_ray.stages.embed import Encoder

    fx = _with_pair(next(f for f in FIXTURES if f["expected"] == "off_topic"), hh_lines)
    enc = Encoder("builtin:minilm")
    sim = float(enc.similarity([last_human_turn(fx["prompt"])], [fx["raw"]])[0])
    floor = RewriteConfig().min_topic_similarity
    assert _verdict(fx)[1] is None  # only the topic check catches it
    assert _verdict(fx, floor, sim) == (None, "off_topic")
    # and a real on-topic rewrite of the same kind stays above it
    ok = _with_pair(next(f for f in FIXTURES if f["expected"] is None and f["role"] == "rejected"), hh_lines)
    reply = _verdict(ok)[0]
    assert float(enc.similarity([last_human_turn(ok["prompt"])], [reply])[0]) > floor


def test_extract_reply_parses_markers_strictly():
    assert extract_reply("Sure! <reply>Use a trap.</reply> Hope it helps", delimited=True) == ("Use a trap.", None)
    assert extract_reply("<REPLY> x y </Reply>", delimited=True) == ("x y", None)
    assert extract_reply("Use a trap.", delimited=True) == (None, "no_delimiter")
    assert extract_reply("<reply>Use a trap and", delimited=True) == (None, "unclosed")
    assert extract_reply("<reply>  </reply>", delimited=True) == (None, "empty")
    assert extract_reply("   ", delimited=False) == (None, "empty")
    assert extract_reply('Rewritten response: "Use a trap."', delimited=False) == ("Use a trap.", None)


def test_template_echo_needs_wording_the_sources_do_not_have():
    grams = template_ngrams(load_prompt("rewrite_rejected").wording)
    ctx = "\n\nHuman: How do I patch drywall?\n\nAssistant:\nUse spackle.\nUse glue."
    # the instruction repeated
    assert echoes_template("Write the assistant's next reply, but make it short.", ctx, grams)
    # a phrase the template shares with the conversation is not an echo
    assert not echoes_template(
        "We stay on the topic of drywall: use spackle and sand it.", ctx + " on the topic of", grams
    )
    # a transcript turn in a reply, although the conversation has them
    assert echoes_template("Human: and paint?", ctx, grams, replies="Use spackle.\nUse glue.")
    assert not echoes_template("Patch it with spackle, then sand.", ctx, grams, replies="Use spackle.\nUse glue.")
    # task talk, unless the sources already talk that way
    assert echoes_template("A better reply would be: use spackle.", ctx, grams)
    assert not echoes_template("A better answer is spackle.", ctx + " a better answer", grams)
    # the question asked back
    assert (
        echoes_template(
            "The answer to: how do I patch drywall? is unknown.",
            "\n\nHuman: How do I patch drywall today?\n\nAssistant:",
            grams,
        )
        is False
    )
    assert echoes_template(
        "how do i patch drywall today? spackle.", "\n\nHuman: How do I patch drywall today?\n\nAssistant:", grams
    )


def test_truncation_length_and_degenerate_reasons():
    assert looks_truncated("Use spackle and then", "Use spackle.")
    assert not looks_truncated("Use spackle and then", "use spackle and then")  # the source did not end cleanly either
    assert not looks_truncated("Use spackle 🙂", "Use spackle.")
    kw = dict(context="q", ngrams=frozenset(), min_length_ratio=0.5, max_length_ratio=2.0)
    assert rewrite_rejection("Use spackle on it.", "No.", **kw) == "too_short"
    assert rewrite_rejection("Use it.", "Use spackle, then sand it, then paint it twice.", **kw) == "too_long"
    assert rewrite_rejection("a b c d e f.", "go go go go go go go go.", **kw) == "degenerate"
    assert rewrite_rejection("Use spackle on it.", "Try some glue on it.", **kw) is None
    assert (
        rewrite_rejection(
            "Use spackle on it.", "Try some glue on it.", topic_similarity=-0.2, min_topic_similarity=0.0, **kw
        )
        == "off_topic"
    )


def test_fixtures_cover_every_case_the_issue_names():
    cases = {f["case"] for f in FIXTURES}
    assert {"echo_after_reply", "template_only", "off_topic", "well_formed", "transcript_continued"} <= cases
