"""In-process stages (``resources.in_process``): actors reused across calls, at most
``resources.in_process_keep`` of them (and their models) kept. No Ray."""

from __future__ import annotations

import gc
import weakref
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pytest

from mars_ray.config import Config
from mars_ray.stages.common import clear_local_actors, map_with_actors


class _Model:
    """Stands for the weights an actor holds (only its lifetime is observed)."""


class CountingActor:
    built: ClassVar[list[int]] = []
    models: ClassVar[list[weakref.ref]] = []

    def __init__(self, *, scale: int, num_threads=None):
        self.scale = scale
        self.model = _Model()
        CountingActor.built.append(scale)
        CountingActor.models.append(weakref.ref(self.model))

    def __call__(self, batch):
        return {"x": np.asarray(batch["x"]) * self.scale}


@pytest.fixture
def actors():
    clear_local_actors()
    CountingActor.built, CountingActor.models = [], []
    yield CountingActor
    clear_local_actors()


def _run(scale: int, keep: int = 2) -> list[int]:
    res = Config.load(overrides={"resources.in_process": "true", "resources.in_process_keep": str(keep)}).resources
    out = map_with_actors(pa.table({"x": [1, 2, 3]}), CountingActor, {"scale": scale}, resources=res, batch_size=2)
    return out.column("x").to_pylist()


def test_in_process_actors_are_reused_and_the_least_recent_dropped_with_its_model(actors):
    assert _run(2) == [2, 4, 6] and _run(3) == [3, 6, 9]
    assert _run(2) == [2, 4, 6] and actors.built == [2, 3]  # reused: no second model load
    assert _run(5) == [5, 10, 15] and actors.built == [2, 3, 5]  # 3 was the least recently used
    gc.collect()
    alive = [ref() is not None for ref in actors.models]
    assert alive == [True, False, True]  # the dropped actor's model is freed
    assert _run(2) == [2, 4, 6] and actors.built == [2, 3, 5]  # 2 stayed
    assert _run(3) == [3, 6, 9] and actors.built == [2, 3, 5, 3]  # 3 is built again


def test_keep_one_holds_only_the_actor_in_use(actors):
    for scale in (2, 3, 2):
        _run(scale, keep=1)
    gc.collect()
    assert actors.built == [2, 3, 2] and sum(ref() is not None for ref in actors.models) == 1


def test_in_process_keep_must_hold_the_actor_in_use():
    with pytest.raises(ValueError, match="in_process_keep=0 must be >= 1"):
        Config.load(overrides={"resources.in_process_keep": "0"}).validate()
