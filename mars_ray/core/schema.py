"""The one Arrow schema every preference pair has, human or synthetic, and stable pair ids.

A human pair has ``origin="human"``, ``epoch=0``, ``operation="original"`` and
``source_pair_id == pair_id``. A synthetic pair (built by the augmentation stages) records the
human pair it came from, the MARS epoch, the operation(s) that made it, the generator and the
allocation weight q_i, so every synthetic row's lineage resolves to an original pair.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

# Column names (use these constants, not string literals, across the package).
PAIR_ID = "pair_id"
PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
SUBSET = "subset"
SPLIT = "split"
SOURCE_FILE = "source_file"
SOURCE_LINE = "source_line"
FLAGS = "flags"
META = "meta"
ORIGIN = "origin"
SOURCE_PAIR_ID = "source_pair_id"
EPOCH = "epoch"
OPERATION = "operation"
GENERATOR = "generator"
WEIGHT = "weight"
# The label margin of a pair (TRL / OpenRLHF "margin": how strongly chosen beats rejected), read
# from the data when it has one; a synthetic pair inherits its source pair's. train.margin_term uses it.
MARGIN = "margin"

ORIGIN_HUMAN = "human"
ORIGIN_SYNTHETIC = "synthetic"
OPERATION_ORIGINAL = "original"

PAIR_SCHEMA = pa.schema(
    [
        pa.field(PAIR_ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(CHOSEN, pa.string(), nullable=False),
        pa.field(REJECTED, pa.string(), nullable=False),
        pa.field(SUBSET, pa.string()),  # e.g. a RewardBench subset or the demo's helpful/harmless
        pa.field(SPLIT, pa.string()),  # train / val / test
        pa.field(SOURCE_FILE, pa.string()),
        pa.field(SOURCE_LINE, pa.int64()),  # 1-based line (jsonl/csv), item (json) or row (parquet)
        pa.field(FLAGS, pa.list_(pa.string())),  # kept-but-noteworthy, e.g. "score_tie", "identical"
        pa.field(META, pa.string()),  # JSON object with reader-specific extras (scores, ids)
        pa.field(ORIGIN, pa.string(), nullable=False),
        pa.field(SOURCE_PAIR_ID, pa.string(), nullable=False),
        pa.field(EPOCH, pa.int32(), nullable=False),
        pa.field(OPERATION, pa.string(), nullable=False),
        pa.field(GENERATOR, pa.string()),
        pa.field(WEIGHT, pa.float64()),
        pa.field(MARGIN, pa.float64()),
    ]
)
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)


def conform(table: pa.Table) -> pa.Table:
    """``table`` in PAIR_SCHEMA's columns and order, nullable columns it lacks (files written
    before a column existed, e.g. ``margin``) filled with nulls; other columns dropped."""
    for f in PAIR_SCHEMA:
        if f.name not in table.column_names:
            if not f.nullable:
                raise ValueError(f"pair table lacks the required column {f.name!r}")
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)


# Every quarantine record has these keys (plus "raw": the row as read, so nothing is lost).
QUARANTINE_FIELDS = ("file", "line", "field", "reason")


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Stable 16-hex-digit id of a (prompt, chosen, rejected) triple.

    Depends on the text only, so the same pair gets the same id in every run, file order and
    machine; identical pairs (duplicates) collide on purpose.
    """
    h = hashlib.sha256()
    for part in (prompt, chosen, rejected):
        b = part.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def human_row(
    *,
    prompt: str,
    chosen: str,
    rejected: str,
    subset: str | None = None,
    source_file: str | None = None,
    source_line: int | None = None,
    flags: list[str] | None = None,
    meta: str | None = None,
    margin: float | None = None,
) -> dict:
    """A row of :data:`PAIR_SCHEMA` for an original (human-labelled) pair; split is set later."""
    pid = pair_id(prompt, chosen, rejected)
    return {
        PAIR_ID: pid,
        PROMPT: prompt,
        CHOSEN: chosen,
        REJECTED: rejected,
        SUBSET: subset,
        SPLIT: None,
        SOURCE_FILE: source_file,
        SOURCE_LINE: source_line,
        FLAGS: flags or [],
        META: meta,
        ORIGIN: ORIGIN_HUMAN,
        SOURCE_PAIR_ID: pid,
        EPOCH: 0,
        OPERATION: OPERATION_ORIGINAL,
        GENERATOR: None,
        WEIGHT: None,
        MARGIN: margin,
    }
