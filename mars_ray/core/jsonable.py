"""NumPy values as JSON's plain ones: for files written with ``json.dumps`` and for checkpoint
state that must load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def json_default(x: Any) -> Any:
    """``json.dumps(..., default=json_default)``: NumPy scalars as Python numbers, arrays as lists."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def plain(value: Any) -> Any:
    """``value`` with every NumPy scalar and array replaced by Python numbers and lists."""
    return json.loads(json.dumps(value, default=json_default))
