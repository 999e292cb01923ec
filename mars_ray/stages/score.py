"""Margin scoring as a Ray Data stage: Δ_i = r(x_i, y_i+) - r(x_i, y_i-) for every pair.

Thin wiring around :mod:`mars_ray.models.reward`. The driver sorts the pairs by approximate
length (characters) and cuts them into length-homogeneous blocks, so every actor batch pads
little; inside the actor :func:`~mars_ray.models.reward.score_pairs` sorts the batch's 2n
sequences by exact token length again. Configuration reaches the actors only through the
constructor kwargs. :func:`score_margins_local` runs the same actor class in-process (tests,
baselines, tiny inputs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.stages.common import actor_cpus, actor_threads, collect_blocks, wait_for_cpus

REWARD_CHOSEN = "reward_chosen"
REWARD_REJECTED = "reward_rejected"
MARGIN = "margin"
_ROW = "__row__"  # input position, carried through the actors to restore input order

SCORE_SCHEMA = pa.schema(
    [
        pa.field(S.PAIR_ID, pa.string(), nullable=False),
        pa.field(REWARD_CHOSEN, pa.float64(), nullable=False),
        pa.field(REWARD_REJECTED, pa.float64(), nullable=False),
        pa.field(MARGIN, pa.float64(), nullable=False),
    ]
)
_INPUT_COLUMNS = (S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED)
# Rough characters per token, only to cap the sort key at the token limits.
_CHARS_PER_TOKEN = 4


class ScoreActor:
    """Loads the reward model once; ``__call__`` scores one numpy batch of pairs.

    ``num_threads`` sets torch's intra-op threads (``None`` leaves them); ``device`` defaults to
    CUDA when this process sees a GPU, else CPU. ``__call__`` takes a batch with pair_id, prompt,
    chosen and rejected and returns pair_id, reward_chosen, reward_rejected and margin (float64).
    """

    def __init__(
        self,
        model_ref: str,
        *,
        seed: int,
        dtype: str,
        max_prompt_tokens: int,
        max_response_tokens: int,
        batch_size: int,
        num_threads: int | None,
        cache_dir: str | None = None,
        offline: bool | None = None,
        device: str | None = None,
        new_head: bool = False,
    ) -> None:
        import torch

        from mars_ray.models.reward import load_reward_model

        # Ray gives num_cpus=1 actors OMP_NUM_THREADS=1; set torch's pool explicitly.
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        from mars_ray.runtime import pick_device

        device = pick_device(device)
        self.model, self.tokenizer = load_reward_model(
            model_ref, seed=seed, dtype=dtype, device=device, cache_dir=cache_dir, offline=offline, new_head=new_head
        )
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_response_tokens = int(max_response_tokens)
        self.batch_size = int(batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mars_ray.models.reward import score_pairs

        rc, rr = score_pairs(
            self.model,
            self.tokenizer,
            batch[S.PROMPT].tolist(),
            batch[S.CHOSEN].tolist(),
            batch[S.REJECTED].tolist(),
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            max_response_tokens=self.max_response_tokens,
        )
        rc = rc.astype(np.float64)
        rr = rr.astype(np.float64)
        out = {S.PAIR_ID: batch[S.PAIR_ID], REWARD_CHOSEN: rc, REWARD_REJECTED: rr, MARGIN: rc - rr}
        if _ROW in batch:
            out[_ROW] = batch[_ROW]
        return out


def actor_kwargs(model_ref: str, cfg: Config, *, num_threads: int | None) -> dict[str, Any]:
    """Everything a :class:`ScoreActor` needs, as plain values (no config object is captured)."""
    return dict(
        model_ref=model_ref,
        seed=int(cfg.seed),
        dtype=cfg.model.dtype,
        max_prompt_tokens=int(cfg.data.max_prompt_tokens),
        max_response_tokens=int(cfg.data.max_response_tokens),
        batch_size=int(cfg.resources.batch_size),
        num_threads=num_threads,
        cache_dir=cfg.model.cache_dir,
        offline=cfg.model.offline,
        # the run's own backbone (model.reward) may be scored with a new head (epoch 1 without a
        # warm-up, the "before" metrics; the pipeline says so); any other model must carry its head
        new_head=model_ref == cfg.model.reward,
    )


def _check_input(table: pa.Table) -> None:
    missing = [c for c in _INPUT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"score_margins: the table lacks column(s) {missing} (has {table.column_names})")


def length_sorted(table: pa.Table, cfg: Config) -> pa.Table:
    """The needed columns plus the input position, longest pair first (approximate: characters of
    prompt + the longer response, each capped near its token limit). Longest first also balances
    an actor pool best (the big batches start first)."""
    _check_input(table)
    p = pc.utf8_length(table.column(S.PROMPT)).to_numpy(zero_copy_only=False).astype(np.int64)
    c = pc.utf8_length(table.column(S.CHOSEN)).to_numpy(zero_copy_only=False).astype(np.int64)
    r = pc.utf8_length(table.column(S.REJECTED)).to_numpy(zero_copy_only=False).astype(np.int64)
    key = np.minimum(p, _CHARS_PER_TOKEN * cfg.data.max_prompt_tokens) + np.minimum(
        np.maximum(c, r), _CHARS_PER_TOKEN * cfg.data.max_response_tokens
    )
    order = np.argsort(-key, kind="stable")
    slim = table.select(list(_INPUT_COLUMNS)).append_column(_ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return slim.take(pa.array(order))


def _finish(parts: list[pa.Table], n: int) -> pa.Table:
    """Concatenate actor outputs and put them back in input order; every row exactly once."""
    out = pa.concat_tables(parts) if parts else None
    rows = np.asarray(out.column(_ROW).to_numpy(zero_copy_only=False)) if out is not None else np.zeros(0, np.int64)
    counts = np.bincount(rows, minlength=n) if n else np.zeros(0, np.int64)
    if len(rows) != n or (n and (counts.max() != 1 or counts.min() != 1)):
        raise RuntimeError(f"scoring returned {len(rows)} rows for {n} inputs (rows lost or duplicated)")
    out = out.take(pa.array(np.argsort(rows, kind="stable")))
    return pa.table(
        {
            S.PAIR_ID: out.column(S.PAIR_ID).cast(pa.string()),
            REWARD_CHOSEN: out.column(REWARD_CHOSEN).cast(pa.float64()),
            REWARD_REJECTED: out.column(REWARD_REJECTED).cast(pa.float64()),
            MARGIN: out.column(MARGIN).cast(pa.float64()),
        },
        schema=SCORE_SCHEMA,
    )


def _empty() -> pa.Table:
    return SCORE_SCHEMA.empty_table()


def score_margins(table: pa.Table, *, model_ref: str, cfg: Config) -> pa.Table:
    """Score every pair with a pool of ``cfg.resources.actors`` Ray Data actors.

    Returns:
        A table (pair_id, reward_chosen, reward_rejected, margin) with one row per input row, in
        input order.

    Raises:
        ValueError: the table lacks prompt/chosen/rejected/pair_id.
        RuntimeError: a row was lost or duplicated on the way (never expected).
    """
    import ray
    import ray.data

    from mars_ray.runtime import init_ray

    _check_input(table)
    n = table.num_rows
    if n == 0:
        return _empty()
    res = cfg.resources
    if res.in_process:
        return score_margins_local(table, model_ref=model_ref, cfg=cfg)
    init_ray(res)
    sorted_table = length_sorted(table, cfg)
    # One block per actor batch: blocks stay length-homogeneous and the pool balances over them.
    bs = int(res.batch_size)
    blocks = [sorted_table.slice(i, bs) for i in range(0, n, bs)]
    threads = actor_threads(res) if res.gpus_per_actor == 0 else None
    wait_for_cpus(actor_cpus(res))
    ds = ray.data.from_arrow(blocks).map_batches(
        ScoreActor,
        fn_constructor_kwargs=actor_kwargs(model_ref, cfg, num_threads=threads),
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(size=int(res.actors)),
        num_cpus=actor_cpus(res),
        num_gpus=res.gpus_per_actor,
        batch_format="numpy",
    )
    out = collect_blocks(ds)
    return _finish([out] if out.num_rows else [], n)


def score_margins_local(table: pa.Table, *, model_ref: str, cfg: Config, actor: ScoreActor | None = None) -> pa.Table:
    """The same :class:`ScoreActor`, same length-sorted batches, in this process without Ray.

    ``actor`` reuses an already loaded actor (it must have been built for the same model/config).
    """
    _check_input(table)
    n = table.num_rows
    if n == 0:
        return _empty()
    if actor is None:
        actor = ScoreActor(**actor_kwargs(model_ref, cfg, num_threads=None))
    sorted_table = length_sorted(table, cfg)
    bs = int(cfg.resources.batch_size)
    parts = []
    for i in range(0, n, bs):
        chunk = sorted_table.slice(i, bs)
        batch = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
        parts.append(pa.table(actor(batch)))
    return _finish(parts, n)
