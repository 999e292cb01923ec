"""The audit of one epoch's synthetic data: what became of every generated text, by operation,
and random kept synthetic pairs beside the human pairs they came from, so a person can judge the
data in a minute. Pure: counts and rows in, dicts and markdown lines out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from mars_ray.core import schema as S

# What became of a generated text, in the order the audit table shows it; anything else is a
# rejection reason of a quality gate.
AUDIT_OUTCOMES = ("kept", "unused", "generation_failed")


def _audit_row(counts: dict[str, int]) -> dict[str, Any]:
    counts = {k: int(v) for k, v in counts.items() if v}
    rejected = {k: v for k, v in sorted(counts.items()) if k not in AUDIT_OUTCOMES}
    return {
        "generated": sum(counts.values()),
        "kept": counts.get("kept", 0),
        "unused": counts.get("unused", 0),
        "generation_failed": counts.get("generation_failed", 0),
        "rejected": rejected,
    }


def audit_operations(para: dict[str, Any], rewrite: dict[str, Counter]) -> dict[str, dict[str, Any]]:
    """Per operation (paraphrase, rewrite-rejected, rewrite-chosen): outputs generated, kept,
    passed but not needed (``unused``), failed, and rejected by each reason. Every output is in
    exactly one of them, so ``generated`` = kept + unused + failed + sum(rejected)."""
    ops: dict[str, dict[str, Any]] = {}
    counts: Counter = Counter()
    for r in [para, *para.get("topup_rounds", [])]:
        counts["kept"] += int(r.get("kept", 0))
        for k, v in r.get("filtered", {}).items():
            counts["unused" if k == "surplus" else k] += int(v)
    if sum(counts.values()):
        ops["paraphrase"] = _audit_row(counts)
    for op in ("rewrite-rejected", "rewrite-chosen"):
        if op in rewrite:
            ops[op] = _audit_row(rewrite[op])
    return ops


def audit_examples(
    rows: Sequence[dict[str, Any]], originals: Sequence[dict[str, Any]], rng: np.random.Generator, k: int = 5
) -> list[dict[str, Any]]:
    """Up to ``k`` random synthetic ``rows`` per operation, each beside the human pair it came
    from (``originals``: rows with pair id, prompt, chosen and rejected)."""
    by_id = {r[S.PAIR_ID]: r for r in originals}
    by_op: dict[str, list[dict]] = {}
    for r in rows:
        by_op.setdefault(r[S.OPERATION], []).append(r)
    out = []
    for op, rs in sorted(by_op.items()):
        for j in sorted(rng.choice(len(rs), size=min(k, len(rs)), replace=False)):
            r = rs[int(j)]
            src = by_id[r[S.SOURCE_PAIR_ID]]
            out.append(
                {
                    "operation": op,
                    "source_pair_id": r[S.SOURCE_PAIR_ID],
                    "prompt": src[S.PROMPT],
                    "original_chosen": src[S.CHOSEN],
                    "original_rejected": src[S.REJECTED],
                    "chosen": r[S.CHOSEN],
                    "rejected": r[S.REJECTED],
                }
            )
    return out


def _cell(t: str, width: int) -> str:
    t = " ".join(str(t).split()).replace("|", "\\|")
    return t if len(t) <= width else t[: width - 1] + "…"


def operations_markdown(operations: dict[str, dict[str, Any]]) -> list[str]:
    """The per-operation table of an audit as markdown lines."""
    lines = [
        "| operation | generated | kept | passed, not needed | failed | rejected by reason |",
        "|---|---|---|---|---|---|",
    ]
    for op, r in operations.items():
        why = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none"
        lines.append(f"| {op} | {r['generated']} | {r['kept']} | {r['unused']} | {r['generation_failed']} | {why} |")
    return lines


def examples_markdown(examples: Sequence[dict[str, Any]], width: int = 240) -> list[str]:
    """Kept synthetic pairs beside their human pairs, as markdown table lines ([] for none)."""
    if not examples:
        return []
    lines = [
        "| operation | prompt (end) | original chosen | original rejected | chosen | rejected |",
        "|---|---|---|---|---|---|",
    ]
    for e in examples:
        same_c, same_r = e["chosen"] == e["original_chosen"], e["rejected"] == e["original_rejected"]
        lines.append(
            f"| {e['operation']} | {_cell(e['prompt'][-width:], width)} | {_cell(e['original_chosen'], width)} | "
            f"{_cell(e['original_rejected'], width)} | {'(same)' if same_c else _cell(e['chosen'], width)} | "
            f"{'(same)' if same_r else _cell(e['rejected'], width)} |"
        )
    return lines


def audit_markdown(audit: dict[str, Any], width: int = 240) -> list[str]:
    """The audit as markdown lines: the per-operation table, then the examples side by side."""
    ex = examples_markdown(audit.get("examples", []), width)
    return operations_markdown(audit.get("operations", {})) + ([""] + ex if ex else [])
