"""West-of-N baseline on a Ray Data actor pool: each actor loads the generator and the current
reward model once, samples N responses per group, scores them and keeps (best, worst)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.config import Config
from mars_ray.core.filters import clean_generation
from mars_ray.core.west_of_n import best_worst, dialogue_messages
from mars_ray.generation.prompts import load_prompt
from mars_ray.stages.common import actor_threads, as_list, map_with_actors, set_threads
from mars_ray.stages.generate import _StatsMixin, build_generator

RESULT_COLUMNS = ("key", "chosen", "rejected", "status", "best_score", "worst_score")


class WestOfNActor(_StatsMixin):
    """``__call__`` takes ``key``, ``prompt`` and ``groups`` (how many pairs this prompt must yield)
    and returns one row per group: ``key`` (``<key>:<group>``), chosen, rejected (empty when the
    group could not make a pair), ``status`` (``ok``, ``too_few_distinct``, ``all_tied``) and scores."""

    def __init__(
        self,
        generator: dict[str, Any],
        *,
        n: int,
        reward_ref: str,
        seed: int,
        gen_seed: int,
        dtype: str,
        max_prompt_tokens: int,
        max_response_tokens: int,
        batch_size: int,
        num_threads: int | None,
        cache_dir: str | None,
        offline: bool | None = None,
    ):
        from mars_ray.models.reward import load_reward_model

        set_threads(num_threads)
        self.n = int(n)
        self.gen = build_generator(dict(generator, gen_seed=gen_seed), batch_size=batch_size, cache_dir=cache_dir)
        self.system = load_prompt("respond").system
        from mars_ray.runtime import pick_device

        self.model, self.tokenizer = load_reward_model(
            reward_ref,
            seed=seed,
            dtype=dtype,
            device=pick_device(),
            cache_dir=cache_dir,
            offline=offline,
            new_head=True,  # epoch 1 may rank by the configured backbone's new head (the pipeline warns)
        )
        self.lim = dict(max_prompt_tokens=int(max_prompt_tokens), max_response_tokens=int(max_response_tokens))
        self.batch_size = int(batch_size)

    def request(self, prompt: str):
        return [{"role": "system", "content": self.system}, *dialogue_messages(prompt)]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from mars_ray.models.reward import score_texts

        before = self.gen.stats.as_dict()
        keys, prompts = as_list(batch["key"]), as_list(batch["prompt"])
        groups = [int(g) for g in as_list(batch["groups"])]
        outs = [[None] * 0 for _ in keys]
        for g in sorted(set(groups)):  # one generate call per distinct output count
            idx = [i for i, k in enumerate(groups) if k == g]
            for i, o in zip(idx, self.gen.generate([self.request(prompts[i]) for i in idx], self.n * g)):
                outs[i] = [clean_generation(t) if t is not None else None for t in o]
        flat = [(i, t) for i, o in enumerate(outs) for t in o if t]
        scores = (
            score_texts(
                self.model,
                self.tokenizer,
                [prompts[i] for i, _ in flat],
                [t for _, t in flat],
                batch_size=self.batch_size,
                **self.lim,
            )
            if flat
            else np.zeros(0)
        )
        by_text: dict[tuple[int, str], float] = {(i, t): float(s) for (i, t), s in zip(flat, scores)}
        rows: dict[str, list] = {c: [] for c in RESULT_COLUMNS}
        for i, o in enumerate(outs):
            for g in range(groups[i]):
                texts = o[g * self.n : (g + 1) * self.n]
                sc = [by_text.get((i, t), float("nan")) if t else float("nan") for t in texts]
                bw = best_worst(texts, sc)
                usable = [t for t in texts if t]
                status = "ok" if bw else ("too_few_distinct" if len(set(usable)) < 2 else "all_tied")
                rows["key"].append(f"{keys[i]}:{g}")
                rows["chosen"].append(texts[bw[0]] if bw else "")
                rows["rejected"].append(texts[bw[1]] if bw else "")
                rows["status"].append(status)
                rows["best_score"].append(sc[bw[0]] if bw else float("nan"))
                rows["worst_score"].append(sc[bw[1]] if bw else float("nan"))
        out = {
            c: np.array(v, dtype=object if c in ("key", "chosen", "rejected", "status") else np.float64)
            for c, v in rows.items()
        }
        stats = self._stats_columns(len(rows["key"]), before)
        return {**out, **stats}


def west_of_n_groups(prompts: pa.Table, cfg: Config, *, reward_ref: str, groups: np.ndarray, epoch: int) -> pa.Table:
    """Run :class:`WestOfNActor` over ``prompts`` (columns ``key``, ``prompt``) with ``groups``
    pairs per prompt; returns one row per group (see the actor). Sampling is seeded by (seed,
    epoch): a rerun reproduces (and hits the cache), a later epoch draws new responses."""
    section = dataclasses.asdict(cfg.paraphrase)
    section.update(temperature=cfg.mars.west_of_n_temperature, num_beams=1, no_repeat_ngram_size=0)
    table = prompts.append_column("groups", pa.array(np.asarray(groups, dtype=np.int64)))
    table = table.filter(pa.array(np.asarray(groups) > 0))
    kwargs = dict(
        generator=section,
        n=cfg.mars.west_of_n,
        reward_ref=reward_ref,
        seed=cfg.seed,
        gen_seed=cfg.seed + 7919 * int(epoch),
        dtype=cfg.model.dtype,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
        batch_size=cfg.paraphrase.batch(cfg.resources.gpus_per_actor),
        num_threads=actor_threads(cfg.resources),
        cache_dir=cfg.model.cache_dir,
        offline=cfg.model.offline,
    )
    if table.num_rows == 0:
        return pa.table(
            {
                c: pa.array([], pa.string() if c in ("key", "chosen", "rejected", "status") else pa.float64())
                for c in RESULT_COLUMNS
            }
        )
    return map_with_actors(
        table,
        WestOfNActor,
        kwargs,
        resources=cfg.resources,
        batch_size=cfg.paraphrase.batch(cfg.resources.gpus_per_actor),
    )
