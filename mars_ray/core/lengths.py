"""Token-length limits that never drop a pair.

A reward model sees ``prompt + response``. When that is too long we keep the end of the prompt
(the turn being answered is last) and cap the response at its own limit, so the responses being
compared are always present. Right-truncating a whole HH-RLHF transcript would cut off exactly
the responses that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Truncation:
    prompt_ids: list[int]
    response_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool


def truncate_pair_tokens(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_prompt: int, max_response: int
) -> Truncation:
    """Left-truncate the prompt to ``max_prompt`` tokens and cap the response at ``max_response``."""
    if max_prompt < 0 or max_response < 1:
        raise ValueError("max_prompt must be >= 0 and max_response >= 1")
    p = list(prompt_ids)
    r = list(response_ids)
    p_cut = len(p) > max_prompt
    r_cut = len(r) > max_response
    return Truncation(
        prompt_ids=p[len(p) - max_prompt :] if p_cut else p,
        response_ids=r[:max_response] if r_cut else r,
        prompt_truncated=p_cut,
        response_truncated=r_cut,
    )
