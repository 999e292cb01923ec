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


def draw_synthetic_pairs(
    *,
    pair_ids: Sequence[str],
    prompts: Sequence[str],
    subsets: Sequence[str | None],
    chosen: Sequence[str],
    rejected: Sequence[str],
    kept_chosen: Sequence[Sequence[str]],
    kept_rejected: Sequence[Sequence[str]],
    budgets: np.ndarray,
    refined: np.ndarray,
    q: np.ndarray,
    seed: int,
    epoch: int,
    generator: str,
    refined_generator: str,
    margins: Sequence[float | None] | None = None,
) -> list[dict]:
    """PAIR_SCHEMA rows: ``budgets[i]`` draws from pair i's pool (its, possibly refined, responses
    and their kept paraphrases), each pair with its own :func:`pool_rng` stream."""
    rows: list[dict] = []
    for i in (int(j) for j in np.flatnonzero(np.asarray(budgets))):
        draws = sample_pool(
            len(kept_chosen[i]),
            len(kept_rejected[i]),
            int(budgets[i]),
            pool_rng(seed, epoch, pair_ids[i]),
            refined=bool(refined[i]),
        )
        rows += synthetic_rows(
            source_pair_id=pair_ids[i],
            prompt=prompts[i],
            chosen_variants=[chosen[i], *kept_chosen[i]],
            rejected_variants=[rejected[i], *kept_rejected[i]],
            draws=draws,
            epoch=epoch,
            generator=refined_generator if refined[i] else generator,
            weight=float(q[i]),
            refined=bool(refined[i]),
            subset=subsets[i],
            margin=margins[i] if margins is not None else None,
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


def synthetic_rows(
    *,
    source_pair_id: str,
    prompt: str,
    chosen_variants: Sequence[str],
    rejected_variants: Sequence[str],
    draws: Sequence[Draw],
    epoch: int,
    generator: str,
    weight: float,
    refined: bool,
    subset: str | None = None,
    split: str = "train",
    margin: float | None = None,
) -> list[dict]:
    """PAIR_SCHEMA rows for the draws, each carrying its lineage."""
    rows: list[dict] = []
    for d in draws:
        c, r = chosen_variants[d.chosen_index], rejected_variants[d.rejected_index]
        rows.append(
            {
                S.PAIR_ID: S.pair_id(prompt, c, r),
                S.PROMPT: prompt,
                S.CHOSEN: c,
                S.REJECTED: r,
                S.SUBSET: subset,
                S.SPLIT: split,
                S.SOURCE_FILE: None,
                S.SOURCE_LINE: None,
                S.FLAGS: [],
                S.META: None,
                S.ORIGIN: S.ORIGIN_SYNTHETIC,
                S.SOURCE_PAIR_ID: source_pair_id,
                S.EPOCH: int(epoch),
                S.OPERATION: operation_name(d, refined),
                S.GENERATOR: generator,
                S.WEIGHT: float(weight),
                S.MARGIN: margin,
            }
        )
    return rows
