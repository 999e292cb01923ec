"""Pairwise judging arithmetic for win-rates, and dialogue prompts for the policy stage.

Pure code (no models, no Ray): verdict parsing, the two-order rule that cancels a judge's position
bias, win-rate statistics with a bootstrap interval, and turning a preference prompt (an HH-RLHF
transcript or a plain instruction) into chat messages for a policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

VERDICTS = ("A", "B", "tie")
OUTCOMES = ("win", "tie", "loss", "invalid")

_TURN = re.compile(r"\n\n(Human|Assistant):", re.S)


def to_messages(prompt: str) -> list[dict[str, str]]:
    """Chat messages for a prompt: an HH-RLHF transcript (``\\n\\nHuman: ... \\n\\nAssistant:``)
    becomes its alternating user/assistant turns without the final empty assistant turn; any other
    text is one user turn."""
    text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return [{"role": "user", "content": prompt.strip()}]
    msgs: list[dict[str, str]] = []
    for who, content in zip(parts[1::2], parts[2::2]):
        role = "user" if who == "Human" else "assistant"
        content = content.strip()
        if msgs and msgs[-1]["role"] == role:  # two turns of one speaker: join them
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n\n" + content).strip()
        elif content or role == "user":
            msgs.append({"role": role, "content": content})
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()  # the turn the policy is asked to write (or a trailing reply in a transcript)
    return msgs or [{"role": "user", "content": prompt.strip()}]


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or conversational ``[{"role", "content"}, ...]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


_VERDICT_RE = re.compile(r"\b(tie|draw|equal|A|B)\b", re.I)


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's answer (the first verdict word in it; markdown
    and "Response A"/"Assistant B"/"[[A]]" styles included), or None when there is none."""
    if not text:
        return None
    cleaned = re.sub(r"[*_`#\[\]()\"']", " ", text)
    for m in _VERDICT_RE.finditer(cleaned):
        w = m.group(1)
        if w.lower() in ("tie", "draw", "equal"):
            return "tie"
        if w in ("A", "B"):  # a lone capital letter; "a" is an article
            return w
    return None


def logit_verdict(logp_a: float, logp_b: float, tie_margin: float = 0.0) -> str:
    """A verdict from the judge's log-probabilities of answering "A" and "B"."""
    d = float(logp_a) - float(logp_b)
    if abs(d) <= tie_margin:
        return "tie"
    return "A" if d > 0 else "B"


def combine_orders(first: str | None, swapped: str | None) -> str:
    """The outcome for policy X against Y from two verdicts: ``first`` judged (A=X, B=Y), ``swapped``
    judged (A=Y, B=X). A win needs both orders to prefer X, a loss both to prefer Y; a split or a
    tie in either order is a tie (so a judge that always picks one position scores 50%); a missing
    verdict in either order makes the prompt ``invalid`` (reported, not counted)."""
    if first not in VERDICTS or swapped not in VERDICTS:
        return "invalid"
    x_first = {"A": 1, "B": -1, "tie": 0}[first]
    x_swapped = {"A": -1, "B": 1, "tie": 0}[swapped]
    total = x_first + x_swapped
    if total == 2:
        return "win"
    if total == -2:
        return "loss"
    return "tie"


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def winrate_summary(
    outcomes: Sequence[str],
    first_verdicts: Sequence[str | None] = (),
    *,
    seed: int = 0,
    n_boot: int = 10000,
    level: float = 0.95,
) -> dict[str, Any]:
    """Wins, ties, losses and the win-rate of X over Y with ties as half a win.

    ``win_rate = (wins + ties / 2) / (wins + ties + losses)`` over the valid prompts, with a
    percentile bootstrap interval over prompts; ``decisive_win_rate`` is wins / (wins + losses)
    with a Wilson interval. ``first_verdicts`` (the verdicts with X shown first) give the judge's
    position bias: how often it picked the first-shown response ("A") across both orders.
    """
    counts = {o: int(sum(1 for x in outcomes if x == o)) for o in OUTCOMES}
    unknown = [x for x in outcomes if x not in OUTCOMES]
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(set(unknown))}; expected {OUTCOMES}")
    valid = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[x] for x in outcomes if x != "invalid"])
    n = int(valid.size)
    out: dict[str, Any] = {**counts, "n": n, "n_prompts": len(outcomes)}
    if n == 0:
        out.update(
            win_rate=float("nan"),
            ci_low=float("nan"),
            ci_high=float("nan"),
            decisive_win_rate=float("nan"),
            decisive_ci_low=float("nan"),
            decisive_ci_high=float("nan"),
        )
        return out
    rng = np.random.default_rng(seed)
    boot = valid[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    decisive = counts["win"] + counts["loss"]
    dlo, dhi = wilson_interval(counts["win"], decisive, level)
    out.update(
        win_rate=float(valid.mean()),
        ci_low=float(lo),
        ci_high=float(hi),
        level=level,
        decisive_win_rate=counts["win"] / decisive if decisive else float("nan"),
        decisive_ci_low=dlo,
        decisive_ci_high=dhi,
    )
    return out


def position_bias(first: Sequence[str | None], swapped: Sequence[str | None]) -> dict[str, float]:
    """How often the judge picked position A, and how often its two orders agreed on a response."""
    picks = [v for v in list(first) + list(swapped) if v in VERDICTS]
    agree = [combine_orders(a, b) in ("win", "loss") for a, b in zip(first, swapped) if a in VERDICTS and b in VERDICTS]
    return {
        "picked_first_position": float(np.mean([v == "A" for v in picks])) if picks else float("nan"),
        "orders_agree": float(np.mean(agree)) if agree else float("nan"),
    }
