"""Rendered chat texts back to conversations (mars_ray/core/chat_formats.py), on the texts the real
templates produce: TRL 1.16 ships the original chat templates of Qwen 2.5, Llama 3 / 3.1, Gemma 1-3
and Phi-3 / 3.5 (``trl/chat_templates/*.jinja``), rendered here with transformers' own renderer.
Mistral's template is not among them; its rendered shapes are written out from the mistralai
cookbook (``concept-deep-dive/tokenization/chat_templates.md``: v1 ``<s> [INST] user [/INST]
assistant</s>``, v3 ``<s>[INST] user[/INST] assistant</s>``, Tekken ``<s>[INST]user[/INST]assistant</s>``).

Each query is built as OpenRLHF builds ``query`` (0.9.1+, ``SingleTurnAgentExecutor``): the prompt
rendered with ``add_generation_prompt=True``, then the response, then the end-of-turn text when the
generation stopped on its own (absent when it hit the length cap).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mars_ray.core.chat_formats import parse_rendered

TRL_TEMPLATES = Path(pytest.importorskip("trl").__file__).parent / "chat_templates"

USER1, REPLY1, USER2, REPLY2 = "What is 2+2?", "4", "And 3+3?", "It is 6.\n\nAnything else?"
CONVERSATIONS = {
    "single": [{"role": "user", "content": USER1}, {"role": "assistant", "content": REPLY1}],
    "multi": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": REPLY1},
        {"role": "user", "content": USER2},
        {"role": "assistant", "content": REPLY2},
    ],
}
# template file, end-of-turn text after a finished reply, family, whether a system turn survives
FAMILIES = [
    ("qwen2_5", "<|im_end|>", "chatml", True),
    ("llama3", "<|eot_id|>", "llama3", True),
    ("llama3_1", "<|eot_id|>", "llama3", True),
    ("gemma", "<end_of_turn>", "gemma", False),  # no system role: the template raises on one
    ("gemma3", "<end_of_turn>", "gemma", False),  # merges the system text into the first user turn
    ("phi3", "<|end|>", "phi", True),
    ("phi3_5", "<|end|>", "phi", True),
]


def _render(template: str, messages: list[dict], **kw) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    text = (TRL_TEMPLATES / f"{template}.jinja").read_text()
    special = {"bos_token": "<s>" if template.startswith("phi") else "<bos>", "eos_token": "<|endoftext|>"}
    if template.startswith("llama"):
        special["bos_token"] = "<|begin_of_text|>"
    rendered = render_jinja_template([messages], chat_template=text, **special, **kw)
    return rendered[0][0] if isinstance(rendered, tuple) else rendered[0]


@pytest.mark.parametrize("finished", [True, False], ids=["eos", "length-capped"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize(("template", "eot", "family", "system"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_openrlhf_queries_of_every_family_parse_back_to_the_conversation(template, eot, family, system, conv, finished):
    messages = CONVERSATIONS[conv]
    if conv == "multi" and not system and template == "gemma":
        messages = messages[1:]  # Gemma 1/2 refuse a system turn
    prompt = _render(template, messages[:-1], add_generation_prompt=True)
    reply = messages[-1]["content"]
    query = prompt + reply + (eot if finished else "")
    got = parse_rendered(query)
    assert got.family == family, query
    assert got.response == reply.strip(), query
    want = [m for m in messages[:-1] if m["role"] != "system" or system]
    if conv == "multi" and template == "gemma3":  # the system text went into the first user turn
        want = [{"role": "user", "content": "Be brief.\n\n" + USER1}, *messages[2:-1]]
    assert got.messages == want, query


def test_template_default_system_turns_are_dropped():
    """Qwen 2.5 adds its own system turn when the conversation has none, Llama 3.1 a dated one: both
    belong to the policy's template, not the conversation."""
    for template in ("qwen2_5", "llama3_1"):
        query = _render(template, CONVERSATIONS["single"][:1], add_generation_prompt=True) + REPLY1
        got = parse_rendered(query)
        assert got.messages == CONVERSATIONS["single"][:1] and got.response == REPLY1 and got.dropped_system


def test_smollm2_chatml_with_its_default_system(tiny_llama_dir):
    """SmolLM2's own template (the tiny test model carries its tokenizer) injects a default system."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    query = tok.apply_chat_template(CONVERSATIONS["single"][:1], tokenize=False, add_generation_prompt=True)
    got = parse_rendered(query + REPLY1 + tok.eos_token)
    assert (got.family, got.messages, got.response, got.dropped_system) == (
        "chatml",
        CONVERSATIONS["single"][:1],
        REPLY1,
        True,
    )


@pytest.mark.parametrize(
    "query",
    [
        "<s> [INST] What is 2+2? [/INST] 4</s>",  # v1
        "<s>[INST] What is 2+2?[/INST] 4</s>",  # v3
        "<s>[INST]What is 2+2?[/INST]4</s>",  # Tekken
        "<s>[INST] What is 2+2?[/INST] 4",  # length-capped: no </s>
    ],
)
def test_mistral_inst_shapes(query):
    got = parse_rendered(query)
    assert (got.family, got.messages, got.response) == ("mistral", [{"role": "user", "content": USER1}], "4")


def test_mistral_multi_turn():
    got = parse_rendered("<s>[INST] What is 2+2?[/INST] 4</s>[INST] And 3+3?[/INST] It is 6.")
    assert got.messages == [
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": USER2},
    ]
    assert got.response == "It is 6."


def test_hh_transcripts_and_plain_text():
    got = parse_rendered("\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant: It is 6.")
    assert got.family == "hh" and got.response == "It is 6."
    assert got.messages == [
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": USER2},
    ]
    plain = parse_rendered("Just a sentence with <b>html</b> and [brackets].")
    assert (plain.family, plain.messages, plain.response) == (
        "plain",
        [],
        "Just a sentence with <b>html</b> and [brackets].",
    )
    # a prompt alone (no reply yet) is a conversation with an empty response
    only = parse_rendered("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert (only.family, only.messages, only.response) == ("chatml", [{"role": "user", "content": "Hi?"}], "")
