"""Conversations and their one-string form, and the implicit-prompt split of two transcripts.

Every pair stores its prompt as one string. A conversation (TRL's conversational layouts, lists of
``{"role", "content"}`` messages) is stored as an HH-style transcript: ``"\\n\\nHuman: ...
\\n\\nAssistant: ...\\n\\nAssistant:"``, or as the bare user text when the prompt is a single user
turn. :func:`prompt_messages` turns either form back into messages, so a backbone whose tokenizer
has a chat template formats the pair with that template, while encoders read the plain text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mars_ray.core.validation import RowError

ASSISTANT = "\n\nAssistant:"
# role in a message list <-> speaker name in a transcript
SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
ROLES = {v: k for k, v in SPEAKERS.items()}
_TURN = re.compile(r"\n\n(" + "|".join(ROLES) + r"):")


def check_messages(messages: Any, name: str) -> list[Mapping[str, Any]]:
    """``messages`` as a non-empty list of ``{"role", "content"}`` objects with string content."""
    if not isinstance(messages, list) or not messages:
        raise RowError(name, "expected a string or a non-empty list of chat messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "content" not in m or "role" not in m:
            raise RowError(name, f"message {i}: chat messages must be objects with 'role' and 'content'")
        if m["role"] not in SPEAKERS:
            raise RowError(name, f"message {i}: role {m['role']!r} is not one of {', '.join(SPEAKERS)}")
        if not isinstance(m["content"], str):
            raise RowError(name, f"message {i}: content must be a string, got {type(m['content']).__name__}")
    return messages


def messages_to_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The stored prompt of a conversation that the next assistant turn answers."""
    if not messages:
        return ""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    turns = "".join(f"\n\n{SPEAKERS[m['role']]}: {m['content']}" for m in messages)
    return turns + ASSISTANT


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The messages of a stored prompt: transcript turns, else one user turn (none if empty)."""
    if not prompt.strip():
        return []
    parts = _TURN.split(prompt)
    if len(parts) == 1:
        return [{"role": "user", "content": prompt}]
    out = []
    if parts[0].strip():
        out.append({"role": "user", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        out.append({"role": ROLES[speaker], "content": content.strip()})
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()  # the open "Assistant:" turn the response fills
    return out


def split_last_assistant(messages: Any, name: str) -> tuple[list[Mapping[str, Any]], str]:
    """(the messages before it, the content of the final assistant message)."""
    msgs = check_messages(messages, name)
    last = msgs[-1]
    if last["role"] != "assistant":
        raise RowError(name, f"last chat message has role {last['role']!r}, expected 'assistant'")
    return list(msgs[:-1]), str(last["content"])


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by binary search over C-level slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two full texts sharing their prompt.

    HH-style transcripts split after the last ``"\\n\\nAssistant:"`` of the shared prefix. Plain
    texts (TRL's standard implicit-prompt layout, ``"The sky is blue."`` / ``"The sky is green."``)
    split at the last whitespace of the shared prefix, so no word is cut; the prompt is empty when
    they share no whole word.
    """
    common = common_prefix_len(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, common)  # the last marker lying wholly in the shared prefix
    if cut >= 0:
        end = cut + len(ASSISTANT)
        return chosen[:end], chosen[end:].lstrip(" "), rejected[end:].lstrip(" ")
    if ASSISTANT in chosen or ASSISTANT in rejected:
        raise RowError(
            "chosen" if ASSISTANT not in chosen else "rejected",
            "no shared '\\n\\nAssistant:' turn to split the prompt from the response",
        )
    end = common
    if common < min(len(chosen), len(rejected)) and not (chosen[common].isspace() and rejected[common].isspace()):
        end = max(chosen.rfind(" ", 0, common), chosen.rfind("\n", 0, common), 0)
    prompt = chosen[:end].rstrip()
    return prompt, chosen[end:].lstrip(), rejected[end:].lstrip()
