"""Token-length limits that never drop a pair.

A reward model sees ``prompt + response``. When that is too long we keep the end of the prompt
(the turn being answered is last) and cap the response at its own limit, so the responses being
compared are always present. Right-truncating a whole HH-RLHF transcript would cut off exactly
the responses that differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def length_grouped_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, rng, group: int = 32
) -> list[list[int]]:
    """Micro-batches of ``order`` with little padding, still in random order.

    ``order`` (an already shuffled list of row indices) is cut into windows of ``group`` batches;
    each window is sorted by ``lengths`` (longest first, stable) and cut into batches of
    ``batch_size``; then the batch order is shuffled with ``rng`` (a NumPy Generator). Every index
    appears exactly once; batch sizes are those of plain slicing of each window (only a window's
    last batch can be short). ``group=1`` is plain slicing of ``order``.
    """
    if batch_size < 1 or group < 1:
        raise ValueError("batch_size and group must be >= 1")
    order = [int(i) for i in order]
    window = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        if group > 1:
            chunk = sorted(chunk, key=lambda i: -int(lengths[i]))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    if group > 1 and len(batches) > 1:
        perm = rng.permutation(len(batches))
        batches = [batches[p] for p in perm]
    return batches
