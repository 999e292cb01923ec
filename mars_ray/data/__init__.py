"""Preference-data layer: readers for every supported format, validation with quarantine,
deterministic subsets and splits, ``data prepare``/``inspect`` and the built-in demo data.

May import :mod:`mars_ray.config`, :mod:`mars_ray.core` and :mod:`mars_ray.models` (tokenizers for
length statistics); Ray only inside :func:`to_ray_dataset`.
"""

from mars_ray.data.files import DataFileError
from mars_ray.data.load import (
    BUILTIN_DATASETS,
    LoadResult,
    builtin_path,
    length_stats,
    read_preferences,
    to_ray_dataset,
    write_quarantine,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DataFileError",
    "LoadResult",
    "builtin_path",
    "length_stats",
    "read_preferences",
    "to_ray_dataset",
    "write_quarantine",
]
