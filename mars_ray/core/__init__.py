"""Pure algorithm code: Python, NumPy (and torch where a model is involved). Never imports ray.

What lives here: the pair schema and ids, validation, splits, length limits, allocation, semantic
distance, pools and lineage, quality gates, the refinement protocol, losses, held-out metrics
(:mod:`~mars_ray.core.metrics`) and judging. Everything takes plain values, arrays or dataclasses
plus an explicit ``numpy.random.Generator`` where randomness is involved, so it is unit-tested in
milliseconds. May import only :mod:`mars_ray.core` itself (and the prompt files' folder).
"""

from mars_ray.core.schema import (
    PAIR_COLUMNS,
    PAIR_SCHEMA,
    QUARANTINE_FIELDS,
    pair_id,
)
from mars_ray.core.splits import SPLITS, assign_splits, select_subset
from mars_ray.core.validation import RowError, pair_problems

__all__ = [
    "PAIR_COLUMNS",
    "PAIR_SCHEMA",
    "QUARANTINE_FIELDS",
    "SPLITS",
    "RowError",
    "assign_splits",
    "pair_id",
    "pair_problems",
    "select_subset",
]
