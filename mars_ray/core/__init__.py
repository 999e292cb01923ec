"""Pure algorithm code: Python, NumPy (and torch where a model is involved). Never imports ray.

Everything here takes plain values, arrays or dataclasses plus an explicit
``numpy.random.Generator`` where randomness is involved, so it is unit-tested in milliseconds.
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
