"""Conversations back from their rendered text: the chat-template families RL frameworks send.

An RL framework that calls a remote reward model usually sends one string per rollout: the
policy's chat template applied to the prompt, then the generated response and, when generation
stopped on its own, the end-of-turn token (OpenRLHF's ``query``; verl renders the reward model's
template the same way). Scoring that string as a plain text would wrap a template in the reward
model's own template. :func:`parse_rendered` recovers the messages instead, so the reward model
reads the conversation in the format it was trained on.

Families (markers as their templates print them; a leading BOS string and trailing end-of-turn or
EOS strings are accepted anywhere a template may put them):

- ``chatml`` (Qwen, SmolLM2, many others): ``<|im_start|>ROLE\\n CONTENT <|im_end|>``
- ``llama3``: ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n CONTENT <|eot_id|>``
- ``gemma``: ``<start_of_turn>user|model\\n CONTENT <end_of_turn>`` (``model`` is the assistant)
- ``mistral``: ``[INST] USER [/INST] ASSISTANT </s>`` (v1, v3 and Tekken spacing)
- ``phi``: ``<|system|>``, ``<|user|>``, ``<|assistant|>`` turns ended by ``<|end|>``
- ``hh``: ``Human: ... Assistant: ...`` transcripts (HH-RLHF, and mars_ray's stored prompts)
- ``plain``: anything else, returned as one text.

A system turn that a template injects by default (Qwen 2.5's, SmolLM2's, Llama 3.1's dated
header) belongs to the policy's template, not to the conversation, and is dropped; any other
system turn is kept. Pure Python; no tokenizer is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FAMILIES", "ParsedChat", "parse_rendered"]

FAMILIES = ("chatml", "llama3", "gemma", "mistral", "phi", "hh", "plain")

# Strings a template or a tokenizer's decode may put before the first turn or after the last.
_BOS = ("<|begin_of_text|>", "<|startoftext|>", "<bos>", "<s>")
_END = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end|>",
    "</s>",
    "<eos>",
)

# System texts that templates add when the conversation has none (not the conversation's own).
_DEFAULT_SYSTEMS = (
    re.compile(r"^You are Qwen, created by Alibaba Cloud\. You are a helpful assistant\.$"),
    re.compile(r"^You are a helpful AI assistant named SmolLM, trained by Hugging Face$"),
)
# ... and text a template writes at the start of every system turn (Llama 3.1's dated header).
_SYSTEM_HEADERS = (re.compile(r"^Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*(\n\n|$)"),)


@dataclass
class ParsedChat:
    """The conversation in a rendered text: ``messages`` before the final assistant turn and that
    turn's text (``response``, empty when the text ends before it); ``family`` says which template
    was recognised; ``dropped_system`` whether a template's default system turn was left out."""

    family: str
    messages: list[dict[str, str]] = field(default_factory=list)
    response: str = ""
    dropped_system: bool = False


def _strip_ends(text: str) -> str:
    t = text
    changed = True
    while changed:
        changed = False
        for end in _END:
            if t.rstrip().endswith(end):
                t = t.rstrip()[: -len(end)]
                changed = True
    return t


def _strip_bos(text: str) -> str:
    t = text
    for bos in _BOS:
        if t.startswith(bos):
            return t[len(bos) :]
    return t


def _finish(family: str, turns: list[tuple[str, str]]) -> ParsedChat:
    """Turns (role, content) -> messages + the final assistant response."""
    dropped = False
    if turns and turns[0][0] == "system":
        text = turns[0][1].strip()
        for header in _SYSTEM_HEADERS:
            text = header.sub("", text, count=1)
        if not text.strip() or any(p.match(text.strip()) for p in _DEFAULT_SYSTEMS):
            turns, dropped = turns[1:], True
        else:
            turns = [("system", text.strip()), *turns[1:]]
    response = ""
    if turns and turns[-1][0] == "assistant":
        response = turns[-1][1]
        turns = turns[:-1]
    messages = [{"role": r, "content": c} for r, c in turns]
    return ParsedChat(family, messages, response, dropped)


_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant|tool)\n(.*?)(?=<\|im_end\|>|<\|im_start\|>|\Z)", re.S)


def _chatml(text: str) -> ParsedChat:
    return _finish("chatml", [(m.group(1), _strip_ends(m.group(2)).strip("\n")) for m in _CHATML.finditer(text)])


_LLAMA3 = re.compile(
    r"<\|start_header_id\|>(system|user|assistant|ipython|tool)<\|end_header_id\|>\n\n(.*?)"
    r"(?=<\|eot_id\|>|<\|start_header_id\|>|\Z)",
    re.S,
)


def _llama3(text: str) -> ParsedChat:
    turns = []
    for m in _LLAMA3.finditer(text):
        role = "tool" if m.group(1) == "ipython" else m.group(1)
        turns.append((role, _strip_ends(m.group(2)).strip()))
    return _finish("llama3", turns)


_GEMMA = re.compile(r"<start_of_turn>(user|model|system)\n(.*?)(?=<end_of_turn>|<start_of_turn>|\Z)", re.S)


def _gemma(text: str) -> ParsedChat:
    turns = []
    for m in _GEMMA.finditer(text):
        role = "assistant" if m.group(1) == "model" else m.group(1)
        turns.append((role, _strip_ends(m.group(2)).strip("\n").strip()))
    return _finish("gemma", turns)


_PHI = re.compile(r"<\|(system|user|assistant)\|>\n?(.*?)(?=<\|end\|>|<\|(?:system|user|assistant)\|>|\Z)", re.S)


def _phi(text: str) -> ParsedChat:
    return _finish("phi", [(m.group(1), _strip_ends(m.group(2)).strip("\n").strip()) for m in _PHI.finditer(text)])


_INST = re.compile(r"\[INST\](.*?)\[/INST\]", re.S)


def _mistral(text: str) -> ParsedChat:
    turns: list[tuple[str, str]] = []
    matches = list(_INST.finditer(text))
    for i, m in enumerate(matches):
        turns.append(("user", m.group(1).strip()))
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        answer = _strip_ends(text[m.end() : end].split("</s>")[0])
        if answer.strip() or i + 1 < len(matches):
            turns.append(("assistant", answer.strip()))
    return _finish("mistral", turns)


_HH = re.compile(r"(?:^|\n\n)(Human|Assistant|System):", re.S)
_HH_ROLE = {"Human": "user", "Assistant": "assistant", "System": "system"}


def _hh(text: str) -> ParsedChat:
    parts = _HH.split(text)
    turns = []
    lead = parts[0].strip()
    if lead:
        turns.append(("user", lead))
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append((_HH_ROLE[speaker], content.strip()))
    return _finish("hh", turns)


def _family(text: str) -> str:
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text and "<|end_header_id|>" in text:
        return "llama3"
    if "<start_of_turn>" in text:
        return "gemma"
    if re.search(r"<\|(user|assistant)\|>", text):
        return "phi"
    if _INST.search(text):
        return "mistral"
    if re.match(r"\s*(Human|System):", text) or "\n\nHuman:" in text:
        return "hh"
    return "plain"


_PARSERS = {"chatml": _chatml, "llama3": _llama3, "gemma": _gemma, "phi": _phi, "mistral": _mistral, "hh": _hh}


def parse_rendered(text: str) -> ParsedChat:
    """The conversation a rendered text holds (see the module docstring); ``plain`` when no
    family's markers are found, with the whole text as the response and no messages."""
    body = _strip_bos(text.lstrip())
    family = _family(body)
    if family == "plain":
        return ParsedChat("plain", [], text)
    parsed = _PARSERS[family](body)
    if not parsed.messages and not parsed.response:
        return ParsedChat("plain", [], text)
    return parsed
