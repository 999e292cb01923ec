"""Small helpers shared by the Ray Data stages."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.core import chaos


def set_threads(num_threads: int | None) -> None:
    """Ray gives num_cpus=1 actors OMP_NUM_THREADS=1; set torch's pool to what the actor was given."""
    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))


def actor_cpus(resources) -> float:
    """Logical CPUs a stage actor reserves: ``resources.cpus_per_actor``, else 1 (so an actor pool
    that is still shutting down never holds up the next stage's)."""
    return float(resources.cpus_per_actor) if resources.cpus_per_actor is not None else 1.0


def actor_threads(resources) -> int:
    """torch threads for a stage actor: its reservation when set, else an even share of the
    cluster's CPUs over the pool (stages run one after another)."""
    from mars_ray.runtime import auto_cpus

    return max(1, int(round(auto_cpus(resources.cpus_per_actor, resources.actors))))


_LOCAL_ACTORS: OrderedDict[str, Any] = OrderedDict()


def local_actor(actor_cls: type, kwargs: dict[str, Any], *, keep: int = 2) -> Any:
    """``actor_cls(**kwargs)`` built once per process and reused (``resources.in_process``): later
    epochs and stages with the same constructor arguments skip the model load. At most ``keep``
    actors stay (``resources.in_process_keep``): the least recently used ones, and the models they
    hold, are dropped before a new one is built."""
    import json

    from mars_ray.runtime import release_memory

    key = actor_cls.__qualname__ + json.dumps(kwargs, sort_keys=True, default=str)
    if key in _LOCAL_ACTORS:
        _LOCAL_ACTORS.move_to_end(key)
        return _LOCAL_ACTORS[key]
    dropped = 0
    while len(_LOCAL_ACTORS) >= max(1, keep):
        _LOCAL_ACTORS.popitem(last=False)
        dropped += 1
    if dropped:
        release_memory()  # the dropped models' tensors, before the new actor loads its own
    _LOCAL_ACTORS[key] = actor_cls(**kwargs)
    return _LOCAL_ACTORS[key]


def clear_local_actors() -> int:
    """Drop every in-process actor (and the models it holds); returns how many there were."""
    n = len(_LOCAL_ACTORS)
    _LOCAL_ACTORS.clear()
    return n


def map_with_actors(
    table: pa.Table, actor_cls: type, kwargs: dict[str, Any], *, resources, batch_size: int
) -> pa.Table:
    """Stream ``table`` through an actor pool running ``actor_cls(**kwargs)`` and collect the result.

    Resources come from the typed config (``resources``): pool size, CPUs and GPUs per actor. With
    ``resources.in_process`` the same actor class runs in this process, batch by batch, without
    Ray Data (tiny data, debugging: no actor start-up).
    """
    if getattr(resources, "in_process", False):
        actor = local_actor(
            actor_cls,
            {k: v for k, v in kwargs.items() if k != "num_threads"} | {"num_threads": None}
            if "num_threads" in kwargs
            else kwargs,
            keep=int(getattr(resources, "in_process_keep", 2)),
        )
        parts = []
        for i in range(0, table.num_rows, batch_size):
            chunk = table.slice(i, batch_size)
            batch = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in chunk.column_names}
            parts.append(pa.table(actor(batch)))
            _advance(chunk.num_rows)
        parts = [t for t in parts if t.num_rows]
        return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})

    import ray.data

    wait_for_cpus(actor_cpus(resources))
    # One block per batch, so the pool can hand batches to all its actors (a single block goes to
    # one actor, whatever the pool size); the batches are the same slices as in-process.
    blocks = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)] or [table]
    ds = ray.data.from_arrow(blocks)
    extra: dict[str, Any] = {}
    if chaos.settings():  # fault-injection rules reach the pool's actors on any cluster
        extra["runtime_env"] = {"env_vars": chaos.settings()}
    out = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_cpus=actor_cpus(resources),
        num_gpus=resources.gpus_per_actor,
        **extra,
    )
    return collect_blocks(out)


def _advance(rows: int) -> None:
    from mars_ray import console

    st = console.current()
    if st is not None:
        st.advance(rows)


def collect_blocks(ds) -> pa.Table:
    """Every output block of ``ds``, streamed: the console's current stage advances as blocks
    finish (the stages map rows one to one, so output rows count input rows done)."""
    tables = []
    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if t.num_rows:
            tables.append(t)
            _advance(t.num_rows)
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def wait_for_cpus(need: float, timeout_s: float = 10.0) -> None:
    """Wait until ``need`` CPUs are free before a stage starts its actor pool.

    The previous stage's actors, or a finished Ray Train worker group, release their CPUs a few
    seconds after their work returns; a pool started in that window is queued behind them (and Ray
    Data warns that the cluster has no free CPUs). When the CPUs stay taken (another job, a
    cluster still scaling up) the stage starts anyway and Ray schedules it when they free."""
    import time

    import ray

    if need <= 0 or float(ray.cluster_resources().get("CPU", 0.0)) < need:
        return
    deadline = time.monotonic() + timeout_s
    while float(ray.available_resources().get("CPU", 0.0)) < need and time.monotonic() < deadline:
        time.sleep(0.2)


def as_list(col: Any) -> list:
    return col.tolist() if isinstance(col, np.ndarray) else list(col)
