"""Synthetic pairs from paraphrase pools, with lineage (Algorithm 1, steps 5-6).

For tuple i the pool is {y+ and its kept paraphrases} x {y- and its kept paraphrases}; index 0
on each side is the (possibly refined) response itself. b_i synthetic pairs are drawn from the
pool without replacement and without the original human pair. When the quality gate removed
paraphrases so a pool is smaller than its b_i, the shortfall moves to pairs with spare pool
capacity, highest allocation weight first, so the epoch's budget is still spent exactly whenever
the pools can hold it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mars_ray.core import schema as S
from mars_ray.core.allocation import priority_order


def pool_capacity(n_chosen: int, n_rejected: int, refined: bool = False) -> int:
    """Synthetic pairs a pool can yield: all combinations except the original human pair.

    A refined tuple's (0, 0) combination is the rewritten pair, not the human one, so it counts.
    """
    return (n_chosen + 1) * (n_rejected + 1) - (0 if refined else 1)


def fit_budgets(
    b: np.ndarray, capacity: np.ndarray, q: np.ndarray, tiebreak: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Clip b to capacity and move the excess to pairs with room, one unit at a time in order of
    descending q (ties by ``tiebreak``, see :func:`~mars_ray.core.allocation.priority_order`).
    Returns (new budgets, units that fit nowhere)."""
    b = np.asarray(b, dtype=np.int64)
    cap = np.asarray(capacity, dtype=np.int64)
    out = np.minimum(b, cap)
    excess = int(b.sum() - out.sum())
    order = priority_order(q, tiebreak)
    while excess > 0:
        room = [i for i in order if out[i] < cap[i]]
        if not room:
            break
        for i in room:
            if excess == 0:
                break
            out[i] += 1
            excess -= 1
    return out, excess


@dataclass(frozen=True)
class Draw:
    """One synthetic pair: variant indices into the chosen and rejected lists of a tuple."""

    chosen_index: int
    rejected_index: int


def sample_pool(n_chosen: int, n_rejected: int, k: int, rng: np.random.Generator, refined: bool = False) -> list[Draw]:
    """k distinct (chosen variant, rejected variant) draws, never the original human pair."""
    cols = n_rejected + 1
    total = (n_chosen + 1) * cols
    first = 0 if refined else 1  # flat index 0 is (0, 0)
    cap = total - first
    if k > cap:
        raise ValueError(f"cannot draw {k} distinct pairs from a pool of {cap}")
    if k == 0:
        return []
    flat = rng.choice(cap, size=k, replace=False) + first
    return [Draw(int(f // cols), int(f % cols)) for f in np.sort(flat)]


def pool_rng(seed: int, epoch: int, pair_id: str) -> np.random.Generator:
    """The random stream of one pair's pool draws in one epoch, keyed by the pair's content id.

    One stream per pair, not one for the epoch: a pool that came out another size (a paraphrase
    that failed the gate in one run and passed in another) changes that pair's draws only, not
    those of every pair after it, and a pair's draws do not depend on the table's order.
    """
    key = int.from_bytes(hashlib.blake2b(pair_id.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed), int(epoch), key])


@dataclass(frozen=True)
class SyntheticDraw:
    """Everything the pools hold, pair by pair (index i of every sequence is pair i): its id, prompt
    and subset, its (possibly refined) responses and their kept paraphrases, its budget, whether the
    semantic step refined it, its allocation weight and its label margin (None: no margin column)."""

    pair_ids: Sequence[str]
    prompts: Sequence[str]
    subsets: Sequence[str | None]
    chosen: Sequence[str]
    rejected: Sequence[str]
    kept_chosen: Sequence[Sequence[str]]
    kept_rejected: Sequence[Sequence[str]]
    budgets: np.ndarray
    refined: np.ndarray
    q: np.ndarray
    margins: Sequence[float | None] | None = None


def draw_synthetic_pairs(
    pools: SyntheticDraw, *, seed: int, epoch: int, generator: str, refined_generator: str
) -> list[dict]:
    """PAIR_SCHEMA rows: ``budgets[i]`` draws from pair i's pool (its, possibly refined, responses
    and their kept paraphrases), each pair with its own :func:`pool_rng` stream; ``generator`` (or
    ``refined_generator`` for a refined pair) is recorded as the rows' lineage."""
    p = pools
    rows: list[dict] = []
    for i in (int(j) for j in np.flatnonzero(np.asarray(p.budgets))):
        refined = bool(p.refined[i])
        draws = sample_pool(
            len(p.kept_chosen[i]),
            len(p.kept_rejected[i]),
            int(p.budgets[i]),
            pool_rng(seed, epoch, p.pair_ids[i]),
            refined=refined,
        )
        lineage = Lineage(
            source_pair_id=p.pair_ids[i],
            epoch=epoch,
            generator=refined_generator if refined else generator,
            weight=float(p.q[i]),
            refined=refined,
            subset=p.subsets[i],
            margin=p.margins[i] if p.margins is not None else None,
        )
        rows += synthetic_rows(
            p.prompts[i], [p.chosen[i], *p.kept_chosen[i]], [p.rejected[i], *p.kept_rejected[i]], draws, lineage
        )
    return rows


def operation_name(draw: Draw, refined: bool) -> str:
    """'paraphrase:chosen', 'paraphrase:rejected', 'paraphrase:both', prefixed 'rewrite+' if refined."""
    if draw.chosen_index and draw.rejected_index:
        op = "paraphrase:both"
    elif draw.chosen_index:
        op = "paraphrase:chosen"
    elif draw.rejected_index:
        op = "paraphrase:rejected"
    else:
        op = "rewrite"
    return op if not refined or op == "rewrite" else f"rewrite+{op}"


@dataclass(frozen=True)
class Lineage:
    """What every synthetic pair drawn from one source pair records about where it came from."""

    source_pair_id: str
    epoch: int
    generator: str
    weight: float
    refined: bool
    subset: str | None = None
    split: str = "train"
    margin: float | None = None


def synthetic_rows(
    prompt: str,
    chosen_variants: Sequence[str],
    rejected_variants: Sequence[str],
    draws: Sequence[Draw],
    lineage: Lineage,
) -> list[dict]:
    """PAIR_SCHEMA rows for the draws, each carrying its lineage."""
    lin = lineage
    rows: list[dict] = []
    for d in draws:
        c, r = chosen_variants[d.chosen_index], rejected_variants[d.rejected_index]
        rows.append(
            {
                S.PAIR_ID: S.pair_id(prompt, c, r),
                S.PROMPT: prompt,
                S.CHOSEN: c,
                S.REJECTED: r,
                S.SUBSET: lin.subset,
                S.SPLIT: lin.split,
                S.SOURCE_FILE: None,
                S.SOURCE_LINE: None,
                S.FLAGS: [],
                S.META: None,
                S.ORIGIN: S.ORIGIN_SYNTHETIC,
                S.SOURCE_PAIR_ID: lin.source_pair_id,
                S.EPOCH: int(lin.epoch),
                S.OPERATION: operation_name(d, lin.refined),
                S.GENERATOR: lin.generator,
                S.WEIGHT: float(lin.weight),
                S.MARGIN: lin.margin,
            }
        )
    return rows
