"""West-of-N baseline, the pure parts: how the budget becomes prompts, and which pair a group of
N scored responses yields.

The budget B is the number of synthetic pairs. Each pair costs one group of N generated responses
to one training prompt; the best- and worst-scored responses of the group become (chosen,
rejected). Prompts are spread as evenly as the budget allows: with P distinct prompts every prompt
gets ⌊B/P⌋ groups and a seeded random ⌈B mod P⌉ of them one more, so the counts sum to B exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["best_worst", "group_counts"]


def group_counts(n_prompts: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Groups (synthetic pairs) per prompt, summing to ``budget``.

    Raises:
        ValueError: negative budget, or a positive budget with no prompts.
    """
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    if n_prompts <= 0:
        if budget:
            raise ValueError("west-of-n needs at least one prompt to spend a positive budget")
        return np.zeros(0, dtype=np.int64)
    base, extra = divmod(int(budget), int(n_prompts))
    counts = np.full(n_prompts, base, dtype=np.int64)
    if extra:
        counts[rng.choice(n_prompts, size=extra, replace=False)] += 1
    return counts


def best_worst(texts: Sequence[str | None], scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices (best, worst) of one group, or ``None`` when the group cannot make a pair: fewer
    than two distinct usable texts, or all usable texts scored equal. Ties are broken by the first
    occurrence, so the result is deterministic."""
    usable = [i for i, t in enumerate(texts) if t]
    if len({texts[i] for i in usable}) < 2:
        return None
    s = np.asarray([scores[i] for i in usable], dtype=np.float64)
    if not np.all(np.isfinite(s)) or float(s.max()) == float(s.min()):
        return None
    best = usable[int(np.argmax(s))]
    worst = usable[int(np.argmin(s))]
    return best, worst


_TURN = ("\n\nHuman:", "\n\nAssistant:")


def dialogue_messages(prompt: str) -> list[dict[str, str]]:
    """An HH-RLHF style transcript (``\\n\\nHuman: … \\n\\nAssistant: …``, ending with the assistant's
    turn to speak) as chat messages; any other prompt is one user message."""
    text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt
    if not text.startswith(_TURN[0]):
        return [{"role": "user", "content": prompt.strip()}]
    msgs: list[dict[str, str]] = []
    rest = text
    while rest:
        role = "user" if rest.startswith(_TURN[0]) else "assistant" if rest.startswith(_TURN[1]) else None
        if role is None:
            return [{"role": "user", "content": prompt.strip()}]
        rest = rest[len(_TURN[0] if role == "user" else _TURN[1]) :]
        cut = [k for k in (rest.find(_TURN[0]), rest.find(_TURN[1])) if k >= 0]
        end = min(cut) if cut else len(rest)
        content, rest = rest[:end].strip(), rest[end:]
        if content or role == "user":
            msgs.append({"role": role, "content": content})
    if msgs and msgs[-1]["role"] == "assistant":  # a transcript that does not end on the user
        msgs = msgs[:-1] if not msgs[-1]["content"] else msgs
    return msgs or [{"role": "user", "content": prompt.strip()}]
