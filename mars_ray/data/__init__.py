"""Preference-data layer: readers, validation with quarantine, deterministic subsets and splits."""

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
