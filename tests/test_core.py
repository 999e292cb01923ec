from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mars_ray.core.lengths import truncate_pair_tokens
from mars_ray.core.schema import PAIR_SCHEMA, human_row, pair_id
from mars_ray.core.splits import assign_splits, select_subset
from mars_ray.core.validation import pair_problems


def test_import_core_does_not_import_ray():
    code = "import sys, mars_ray.core, mars_ray.config; sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_pair_id_is_stable_and_content_based():
    a = pair_id("p", "c", "r")
    assert a == pair_id("p", "c", "r") and len(a) == 16
    assert a != pair_id("p", "r", "c")
    # Field boundaries matter: ("ab","c") is not ("a","bc").
    assert pair_id("ab", "c", "r") != pair_id("a", "bc", "r")


def test_human_row_fits_the_schema_and_has_lineage():
    import pyarrow as pa

    row = human_row(prompt="p", chosen="c", rejected="r", source_file="f", source_line=3)
    t = pa.Table.from_pylist([row], schema=PAIR_SCHEMA)
    assert t.num_rows == 1
    assert row["source_pair_id"] == row["pair_id"] and row["epoch"] == 0 and row["origin"] == "human"


def test_pair_problems():
    assert pair_problems("", "a", "b") == []  # context-free pairs are legal
    fields = {e.field for e in pair_problems(None, " ", 3)}
    assert fields == {"prompt", "chosen", "rejected"}
    assert pair_problems("p", "a\udcff", "b")[0].reason.startswith("invalid UTF-8")


def test_subset_is_deterministic_and_keeps_groups():
    ids = [f"id{i}" for i in range(100)]
    groups = [f"g{i // 4}" for i in range(100)]
    a = select_subset(ids, groups, 30, seed=1)
    assert len(a) == 30 and list(a) == sorted(a)
    assert np.array_equal(a, select_subset(ids, groups, 30, seed=1))
    assert not np.array_equal(a, select_subset(ids, groups, 30, seed=2))
    # Independent of input order: same ids selected after shuffling the rows.
    perm = np.random.default_rng(0).permutation(100)
    b = select_subset([ids[i] for i in perm], [groups[i] for i in perm], 30, seed=1)
    assert {ids[perm[i]] for i in b} == {ids[i] for i in a}
    assert len(select_subset(ids, groups, None, seed=1)) == 100


def test_splits_sizes_and_no_group_leakage():
    n = 1000
    ids = [f"id{i}" for i in range(n)]
    groups = [f"g{i // 3}" for i in range(n)]
    s = assign_splits(ids, groups, 0.1, 0.2, seed=0)
    counts = {k: int((s == k).sum()) for k in ("train", "val", "test")}
    assert abs(counts["val"] - 100) <= 3 and abs(counts["test"] - 200) <= 3
    for g in set(groups):
        assert len({s[i] for i in range(n) if groups[i] == g}) == 1
    per_pair = assign_splits(ids, ids, 0.1, 0.2, seed=0)
    assert (per_pair == "val").sum() == 100 and (per_pair == "test").sum() == 200


def test_truncation_keeps_prompt_end_and_response_start():
    t = truncate_pair_tokens(list(range(10)), list(range(100, 120)), max_prompt=4, max_response=5)
    assert t.prompt_ids == [6, 7, 8, 9] and t.response_ids == [100, 101, 102, 103, 104]
    assert t.prompt_truncated and t.response_truncated
    t = truncate_pair_tokens([1], [2], max_prompt=4, max_response=5)
    assert (t.prompt_ids, t.response_ids, t.prompt_truncated, t.response_truncated) == ([1], [2], False, False)
    with pytest.raises(ValueError):
        truncate_pair_tokens([1], [2], max_prompt=4, max_response=0)


def test_length_grouped_batches_cover_every_index_once_with_less_padding():
    import numpy as np

    from mars_ray.core.lengths import length_grouped_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=203)
    order = rng.permutation(203)
    batches = length_grouped_batches(order, lengths, 8, np.random.default_rng(1), group=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203)) and all(1 <= len(b) <= 8 for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    plain = length_grouped_batches(order, lengths, 8, np.random.default_rng(1), group=1)
    assert [i for b in plain for i in b] == list(order)  # group=1: plain slicing
    assert padded(batches) < 0.8 * padded(plain)
    again = length_grouped_batches(order, lengths, 8, np.random.default_rng(1), group=10)
    assert again == batches  # deterministic under the seed
