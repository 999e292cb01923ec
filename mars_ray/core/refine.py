"""Refinement of semantically-too-close pairs (Algorithm 1, step 4), batched and pure.

Protocol (MARS v2): rewrite the rejected response up to ``max_rejected`` times, keeping it worse
than the chosen one and plausible for the same dialogue; if the chosen/rejected distance has not
grown, rewrite the chosen response up to ``max_chosen`` times, keeping it helpful, safe and
preferred. Every output first passes the injected ``gate`` (the reply taken out of its markers; template
echo, degenerate, truncated, off-topic and length checks in :mod:`mars_ray.core.filters`). A
rewritten pair is kept only if its distance is larger than the original's, it adds
no harmful content and (v2 §3.2) it is still a valid preference: the injected ``preference``
check (the current reward model's margin, or a judge) still prefers the chosen side; otherwise
the original pair is kept, with the reason.

Each call is batched over all pairs still pending, so an LLM back end sees batches, not single
requests. ``schedule`` says how many attempts one call carries:

- ``sequential``: one attempt per call (the paper's protocol; the fewest generations);
- ``by_role``: all of a role's attempts in one call (rejected, then chosen);
- ``all``: every attempt of both roles in one call.

Candidates are judged in protocol order (rejected attempts 1, 2, ..., then chosen attempts), so
the outcome is the one the sequential protocol reaches with the same texts; batching attempts
only spends generation on candidates that come after a pair's successful one. That is the right
trade where extra rows in a batch are nearly free (a local model on a CPU, where each call costs
about max_new_tokens decoding steps whatever its rows) and the wrong one for a paid endpoint.
The generator, the distance and the harm check are injected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Role = Literal["rejected", "chosen"]

Schedule = Literal["sequential", "by_role", "all"]
SCHEDULES = ("sequential", "by_role", "all")
# [(role, prompt, chosen, rejected, first attempt, count)] -> per request, `count` rewrites of the
# response in `role` (attempts first .. first + count - 1), None for a failed one
RewriteFn = Callable[[Sequence[tuple[Role, str, str, str, int, int]]], list[list[str | None]]]
# (chosen texts, rejected texts) -> distances
DistanceFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# (new text, context) -> reason it is harmful, or None
HarmFn = Callable[[str, str], str | None]
# (prompts, chosen texts, rejected texts) -> margins; > 0 means the chosen side is still preferred
PreferenceFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]
# [(role, item, raw output)] -> per output (the reply it holds, None) or (None, rejection reason)
GateFn = Callable[[Sequence[tuple[Role, "RefineItem", str]]], list[tuple[str | None, str | None]]]

STATUSES = (
    "rewrote_rejected",
    "rewrote_chosen",
    "kept:no_gain",
    "kept:harmful",
    "kept:label_flip",
    "kept:gate_rejected",
    "kept:generation_failed",
)


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
    attempts: int  # protocol attempts spent on this pair (up to and including the successful one)
    harmful_phrase: str | None = None
    label_flips: int = 0  # candidates that grew the distance but no longer kept chosen preferred
    # every output of the generator for this pair by "<role>:<what became of it>" (audit_counts)
    audit: dict[str, int] = field(default_factory=dict)

    @property
    def refined(self) -> bool:
        return self.status.startswith("rewrote")


def _rounds(schedule: str, max_rejected: int, max_chosen: int) -> list[list[tuple[Role, int, int]]]:
    """The calls of a schedule: each a list of (role, first attempt, attempts) windows."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    both: tuple[tuple[Role, int], ...] = (("rejected", max_rejected), ("chosen", max_chosen))
    roles = [(r, k) for r, k in both if k > 0]
    if schedule == "sequential":
        return [[(role, a, 1)] for role, k in roles for a in range(1, k + 1)]
    if schedule == "by_role":
        return [[(role, 1, k)] for role, k in roles]
    return [[(role, 1, k) for role, k in roles]] if roles else []


def refine_batch(
    items: Sequence[RefineItem],
    *,
    rewrite: RewriteFn,
    distance: DistanceFn,
    harmful: HarmFn,
    preference: PreferenceFn | None = None,
    gate: GateFn | None = None,
    max_rejected: int = 5,
    max_chosen: int = 5,
    schedule: Schedule = "sequential",
) -> list[RefineOutcome]:
    """Run the protocol over ``items``; one outcome per item, in order. ``attempts`` of an
    outcome counts the attempts the protocol used (up to and including the successful one).
    ``gate`` (None: every non-blank output is a candidate as it is) turns each raw output into
    the reply it holds or a rejection reason, before the distance; ``preference`` (None: no label
    check) is asked once per round, for every candidate that grew the distance without adding
    harm. ``audit`` of an outcome counts every output the generator returned by what became of it."""
    n = len(items)
    done: list[RefineOutcome | None] = [None] * n
    attempts = [0] * n
    produced = [False] * n  # some output passed the gate (reached the distance test)
    gated = [False] * n  # some output was rejected by the gate
    harm: list[str | None] = [None] * n
    flips = [0] * n
    audit: list[Counter] = [Counter() for _ in range(n)]
    for windows in _rounds(schedule, max_rejected, max_chosen):
        pending = [i for i in range(n) if done[i] is None]
        if not pending:
            break
        reqs = [
            (role, items[i].prompt, items[i].chosen, items[i].rejected, first, k)
            for role, first, k in windows
            for i in pending
        ]
        outs = rewrite(reqs)
        if [len(row) for row in outs] != [r[5] for r in reqs]:
            raise ValueError(f"rewrite returned {[len(row) for row in outs]} texts for {[r[5] for r in reqs]}")
        # Each pending pair's candidates in protocol order (windows in order, attempts in order).
        cands: dict[int, list[tuple[Role, str | None]]] = {i: [] for i in pending}
        for (role, *_), row, i in zip(reqs, outs, [i for _ in windows for i in pending]):
            cands[i] += [(role, t if t and t.strip() else None) for t in row]
        # The gate: raw output -> (reply, reason), in one batch for the round.
        raw = [(i, j, role, t) for i in pending for j, (role, t) in enumerate(cands[i]) if t is not None]
        verdicts = (
            gate([(role, items[i], t) for i, _, role, t in raw]) if gate is not None else [(t, None) for *_, t in raw]
        )
        if len(verdicts) != len(raw):
            raise ValueError(f"gate returned {len(verdicts)} verdicts for {len(raw)} outputs")
        usable: list[tuple[int, int, Role, str]] = []
        for (i, j, role, _), (text, why) in zip(raw, verdicts):
            if why is not None or not text:
                audit[i][f"{role}:{why or 'empty'}"] += 1
                gated[i] = True
            else:
                usable.append((i, j, role, text))
        for i in pending:
            for role, t in cands[i]:
                if t is None:
                    audit[i][f"{role}:generation_failed"] += 1
        new_c = [t if role == "chosen" else items[i].chosen for i, _, role, t in usable]
        new_r = [t if role == "rejected" else items[i].rejected for i, _, role, t in usable]
        dists = np.asarray(distance(new_c, new_r), dtype=np.float64) if usable else np.zeros(0)
        # Pass 1: distance and harm for every candidate that passed the gate, in protocol order.
        ok: list[tuple[int, int, Role, str, float]] = []
        for (i, j, role, text), d in zip(usable, dists):
            produced[i] = True
            if d <= items[i].distance:
                audit[i][f"{role}:no_gain"] += 1
                continue
            why = harmful(text, "\n".join((items[i].prompt, items[i].chosen, items[i].rejected)))
            if why:
                harm[i] = harm[i] or why
                audit[i][f"{role}:harmful"] += 1
                continue
            ok.append((i, j, role, text, float(d)))
        # Pass 2: the label check, batched over the survivors; the first that keeps the label wins.
        prefers = np.ones(len(ok), dtype=bool)
        if preference is not None and ok:
            cs = [t if role == "chosen" else items[i].chosen for i, _, role, t, _ in ok]
            rs = [t if role == "rejected" else items[i].rejected for i, _, role, t, _ in ok]
            margins = np.asarray(preference([items[i].prompt for i, *_ in ok], cs, rs), dtype=np.float64)
            if margins.shape != (len(ok),):
                raise ValueError(f"preference returned {margins.shape} margins for {len(ok)} pairs")
            prefers = margins > 0
        used = {i: len(cands[i]) for i in pending}
        for (i, j, role, text, d), keeps in zip(ok, prefers):
            if done[i] is not None:  # passed everything after an earlier candidate was kept
                audit[i][f"{role}:unused"] += 1
                continue
            if not keeps:
                flips[i] += 1
                audit[i][f"{role}:label_flip"] += 1
                continue
            c = text if role == "chosen" else items[i].chosen
            r = text if role == "rejected" else items[i].rejected
            done[i] = RefineOutcome(c, r, d, f"rewrote_{role}", 0)
            audit[i][f"{role}:kept"] += 1
            used[i] = j + 1
        for i in pending:
            attempts[i] += used[i]
    out: list[RefineOutcome] = []
    for i, it in enumerate(items):
        kept = done[i]
        if kept is not None:
            kept.attempts, kept.label_flips, kept.audit = attempts[i], flips[i], dict(audit[i])
            out.append(kept)
            continue
        if harm[i]:
            status = "kept:harmful"
        elif flips[i]:
            status = "kept:label_flip"
        elif produced[i]:
            status = "kept:no_gain"
        else:
            status = "kept:gate_rejected" if gated[i] else "kept:generation_failed"
        out.append(
            RefineOutcome(it.chosen, it.rejected, it.distance, status, attempts[i], harm[i], flips[i], dict(audit[i]))
        )
    return out


def audit_counts(outcomes: Sequence[RefineOutcome]) -> dict[str, dict[str, int]]:
    """Every rewrite output of ``outcomes`` by operation (``rewrite-rejected``/``rewrite-chosen``)
    and what became of it: a gate reason, ``no_gain``, ``harmful``, ``label_flip``, ``kept``,
    ``unused`` (passed, after an earlier attempt was kept) or ``generation_failed``."""
    by: dict[str, Counter] = {}
    for o in outcomes:
        for key, v in o.audit.items():
            role, why = key.split(":", 1)
            by.setdefault(f"rewrite-{role}", Counter())[why] += v
    return {op: dict(c) for op, c in sorted(by.items())}


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
        "label_flips_rejected": int(sum(o.label_flips for o in outcomes)),
        "audit": audit_counts(outcomes),
    }
