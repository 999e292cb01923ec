"""Refinement of semantically-too-close pairs (Algorithm 1, step 4), batched and pure.

Protocol (MARS v2): rewrite the rejected response up to ``max_rejected`` times, keeping it worse
than the chosen one and plausible for the same dialogue; if the chosen/rejected distance has not
grown, rewrite the chosen response up to ``max_chosen`` times, keeping it helpful, safe and
preferred. A rewritten pair is kept only if its distance is larger than the original's and it adds
no harmful content; otherwise the original pair is kept, with the reason.

Each call is batched over all pairs still pending, so an LLM back end sees batches, not single
requests. A call may carry several attempts (``attempts_per_call``): attempt ``a + k`` is output
``k`` of the call that starts at attempt ``a``, and the candidates are judged in attempt order, so
the outcome is the one the one-attempt-per-call protocol gives for the same texts; only the work
after a pair's successful attempt is spent in vain. That is the right trade where extra rows in a
batch are nearly free (a local model on a CPU or GPU) and the wrong one for a paid endpoint.
The generator, the distance and the harm check are injected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

Role = Literal["rejected", "chosen"]

# ([(role, prompt, chosen, rejected, first attempt)], n) -> per request, n rewrites of the response
# in `role` (attempts first .. first + n - 1), None for a failed one
RewriteFn = Callable[[Sequence[tuple[Role, str, str, str, int]], int], list[list[str | None]]]
# (chosen texts, rejected texts) -> distances
DistanceFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# (new text, context) -> reason it is harmful, or None
HarmFn = Callable[[str, str], str | None]

STATUSES = ("rewrote_rejected", "rewrote_chosen", "kept:no_gain", "kept:harmful", "kept:generation_failed")


@dataclass
class RefineItem:
    prompt: str
    chosen: str
    rejected: str
    distance: float


@dataclass
class RefineOutcome:
    chosen: str
    rejected: str
    distance: float
    status: str  # one of STATUSES
    attempts: int  # rewrite calls spent on this pair
    harmful_phrase: str | None = None

    @property
    def refined(self) -> bool:
        return self.status.startswith("rewrote")


def refine_batch(
    items: Sequence[RefineItem],
    *,
    rewrite: RewriteFn,
    distance: DistanceFn,
    harmful: HarmFn,
    max_rejected: int = 5,
    max_chosen: int = 5,
    attempts_per_call: int = 1,
) -> list[RefineOutcome]:
    """Run the protocol over ``items``; one outcome per item, in order. ``attempts`` of an
    outcome counts the attempts the protocol used (up to and including the successful one)."""
    if attempts_per_call < 1:
        raise ValueError(f"attempts_per_call must be >= 1, got {attempts_per_call}")
    n = len(items)
    done: list[RefineOutcome | None] = [None] * n
    attempts = [0] * n
    produced = [False] * n  # the generator returned usable text at least once
    harm: list[str | None] = [None] * n
    for role, limit in (("rejected", max_rejected), ("chosen", max_chosen)):
        for first in range(1, limit + 1, attempts_per_call):
            pending = [i for i in range(n) if done[i] is None]
            if not pending:
                break
            k = min(attempts_per_call, limit - first + 1)
            reqs = [(role, items[i].prompt, items[i].chosen, items[i].rejected, first) for i in pending]
            outs = rewrite(reqs, k)
            if len(outs) != len(pending) or any(len(row) != k for row in outs):
                raise ValueError(f"rewrite returned {[len(r) for r in outs]} texts for {len(pending)} requests x {k}")
            # Every usable candidate of the call, judged in attempt order (one distance call).
            cands = [(i, j, t) for i, row in zip(pending, outs) for j, t in enumerate(row) if t and t.strip()]
            new_c = [t if role == "chosen" else items[i].chosen for i, _, t in cands]
            new_r = [t if role == "rejected" else items[i].rejected for i, _, t in cands]
            dist = np.asarray(distance(new_c, new_r), dtype=np.float64) if cands else np.zeros(0)
            used = {i: k for i in pending}
            for (i, j, text), c, r, d in zip(cands, new_c, new_r, dist):
                produced[i] = True
                if done[i] is not None or d <= items[i].distance:
                    continue
                context = "\n".join((items[i].prompt, items[i].chosen, items[i].rejected))
                why = harmful(text, context)
                if why:
                    harm[i] = why
                    continue
                used[i] = j + 1
                done[i] = RefineOutcome(c, r, float(d), f"rewrote_{role}", 0)
            for i in pending:
                attempts[i] += used[i]
    out: list[RefineOutcome] = []
    for i, it in enumerate(items):
        if done[i] is not None:
            done[i].attempts = attempts[i]
            out.append(done[i])
            continue
        status = "kept:harmful" if harm[i] else ("kept:no_gain" if produced[i] else "kept:generation_failed")
        out.append(RefineOutcome(it.chosen, it.rejected, it.distance, status, attempts[i], harm[i]))
    return out


def refine_summary(outcomes: Sequence[RefineOutcome]) -> dict:
    """Counts by status, retained = refined share, and total rewrite calls."""
    counts = Counter(o.status for o in outcomes)
    n = len(outcomes)
    refined = sum(counts[s] for s in ("rewrote_rejected", "rewrote_chosen"))
    return {
        "candidates": n,
        "refined": refined,
        "retention": refined / n if n else None,
        "by_status": {s: counts.get(s, 0) for s in STATUSES},
        "rewrite_calls": int(sum(o.attempts for o in outcomes)),
    }
