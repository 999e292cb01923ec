"""Deterministic subset selection and train/val/test splits.

Both depend only on the pairs' content and the seed: never on file order, on the method being
run, or on the process. Every strategy therefore trains and is evaluated on exactly the same
pairs. Grouping by prompt keeps all pairs of one prompt in one split (no prompt leakage).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _rank_keys(keys: Sequence[str], seed: int) -> np.ndarray:
    """A seed-dependent pseudo-random but content-stable rank for each key."""
    salt = f"{seed}\x00".encode()
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(salt + k.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
            for k in keys
        ],
        dtype=np.uint64,
    )


def _order(pair_ids: Sequence[str], groups: Sequence[str], seed: int) -> np.ndarray:
    """Indices ordered by (group rank, pair rank): a shuffle that keeps groups together."""
    group_rank = _rank_keys(groups, seed)
    pair_rank = _rank_keys(pair_ids, seed)
    return np.lexsort((pair_rank, group_rank))


def select_subset(pair_ids: Sequence[str], groups: Sequence[str], max_pairs: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``max_pairs`` pairs, chosen deterministically under ``seed``.

    Whole groups are taken in rank order; the last group may be cut so exactly
    ``min(max_pairs, n)`` pairs are returned. The result is sorted (original order kept).
    """
    n = len(pair_ids)
    if max_pairs is None or max_pairs >= n:
        return np.arange(n)
    order = _order(pair_ids, groups, seed)
    return np.sort(order[:max_pairs])


def assign_splits(
    pair_ids: Sequence[str],
    groups: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Split name per pair ("train"/"val"/"test"), keeping each group in one split.

    Groups are walked in seeded rank order and filled into test, then val, then train until each
    held-out split reaches its target share of pairs (rounded to the nearest pair). With one
    group per pair this gives exactly round(n * fraction) pairs per held-out split.
    """
    n = len(pair_ids)
    out = np.full(n, "train", dtype=object)
    if n == 0:
        return out
    targets = {"test": round(n * test_fraction), "val": round(n * val_fraction)}
    order = _order(pair_ids, groups, seed)
    # Gather groups in rank order.
    group_members: dict[str, list[int]] = {}
    for i in order:
        group_members.setdefault(groups[i], []).append(int(i))
    filled = {"test": 0, "val": 0}
    for members in group_members.values():
        for split in ("test", "val"):
            need = targets[split] - filled[split]
            # Take the group if it brings the split closer to its target.
            if need > 0 and abs(need - len(members)) < need:
                out[members] = split
                filled[split] += len(members)
                break
    return out
