"""Refinement and paraphrase generation on Ray Data actor pools.

Each actor loads its generator (local chat model, seq2seq paraphraser or OpenAI-compatible client,
behind the shared content-hash cache) and a sentence encoder once, then processes batches. The
protocol and the quality gates are the pure functions in :mod:`mars_ray.core`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.core.filters import clean_generation, introduced_harm, paraphrase_rejection
from mars_ray.core.refine import RefineItem, refine_batch
from mars_ray.generation import CachedGenerator, GenParams, LazyGenerator, default_cache
from mars_ray.generation.prompts import render
from mars_ray.stages.common import as_list, set_threads
from mars_ray.stages.embed import Encoder

STAT_COLUMNS = ("gen_requested", "gen_hits", "gen_generated", "gen_failed")


def build_generator(
    section: dict[str, Any], *, batch_size: int, cache_dir: str | None, use_cache: bool = True
) -> CachedGenerator:
    """A cached generator from a rewrite/paraphrase config section (as a plain dict)."""
    from mars_ray.generation.local import make_generator

    params = GenParams(
        max_new_tokens=section["max_new_tokens"],
        temperature=section["temperature"],
        num_beams=section.get("num_beams", 1),
        no_repeat_ngram_size=section.get("no_repeat_ngram_size", 0),
        seed=section.get("seed", 0),
    )
    openai_kwargs: dict[str, Any] = {}
    dtype = None
    if section["backend"] == "openai":
        openai_kwargs = {
            k: section[k]
            for k in ("concurrency", "timeout_s", "max_retries", "max_requests", "max_tokens")
            if k in section
        }
    else:
        from mars_ray.models.reward import generation_dtype

        dtype = generation_dtype(section.get("dtype", "auto"))
        openai_kwargs["dtype"] = dtype
    model_id = str(section["model"]).strip()
    if dtype is not None and str(dtype) != "torch.float32":
        # Other weights, other outputs: the dtype is part of the generator's id (lineage, cache keys).
        model_id = f"{model_id}@{str(dtype).removeprefix('torch.')}"

    def build():
        gen = make_generator(
            section["backend"],
            section["model"],
            params,
            batch_size=batch_size,
            base_url=section.get("base_url"),
            api_key_env=section.get("api_key_env", "OPENAI_API_KEY"),
            cache_dir=cache_dir,
            **openai_kwargs,
        )
        if section["backend"] != "openai":  # an endpoint generator names itself (openai:<model>)
            gen.model_id = model_id
        return gen

    # A local model is loaded on the first request the cache cannot answer (a fully cached batch
    # never loads it); an endpoint client costs nothing to build, and without a cache there is
    # nothing to skip.
    gen = LazyGenerator(model_id, params, build) if use_cache and section["backend"] != "openai" else build()
    return CachedGenerator(gen, default_cache(cache_dir) if use_cache else None)


def output_cap(text: str, ratio: float, max_new_tokens: int, floor: int = 32) -> int:
    """max_new_tokens for an output that should be at most ``ratio`` times ``text``: a token is
    taken as >= 3 characters (generous for English), plus 16 tokens of slack, rounded up to a
    multiple of 32 (so texts of similar length share a batch), at least ``floor``, at most
    ``max_new_tokens``."""
    limit = int(ratio * len(text) / 3) + 16
    return int(min(max_new_tokens, max(floor, -(-limit // 32) * 32)))


def longest_first(table: pa.Table, column: str = "text") -> pa.Table:
    """``table`` sorted by the character length of ``column``, longest first (stable). Fed to a
    generation stage in this order, each batch holds texts of similar length: less prompt padding
    and fewer decoding steps waiting on one long output (64 PKU paraphrases: 27.0 s against 29.6 s
    in file order). Results are matched back by key, so the order is free."""
    if table.num_rows < 2:
        return table
    lengths = np.array([-len(t or "") for t in table.column(column).to_pylist()])
    return table.take(pa.array(np.argsort(lengths, kind="stable")))


def refine_schedule(rewrite: dict[str, Any]) -> str:
    """How many rewrite attempts one generation call carries (:mod:`mars_ray.core.refine`):
    ``rewrite.schedule``, else ``all`` for local models (extra rows in a batch are nearly free: a
    call costs about its decoding steps) and ``sequential`` for an endpoint (each attempt is a
    paid request, and most pairs succeed at the first)."""
    if rewrite.get("schedule"):
        return str(rewrite["schedule"])
    return "sequential" if rewrite["backend"] == "openai" else "all"


class _StatsMixin:
    gen: CachedGenerator

    def _stats_columns(self, n_rows: int, before: dict[str, int]) -> dict[str, np.ndarray]:
        """Generator counters for this batch, on its first row (zeros elsewhere): sums are exact."""
        now = self.gen.stats.as_dict()
        cols = {}
        for name in STAT_COLUMNS:
            col = np.zeros(n_rows, dtype=np.int64)
            if n_rows:
                col[0] = now[name.removeprefix("gen_")] - before[name.removeprefix("gen_")]
            cols[name] = col
        return cols


class RefineActor(_StatsMixin):
    """Rewrites semantically-too-close pairs (rejected first, then chosen), keeps what separates them."""

    def __init__(
        self,
        rewrite: dict[str, Any],
        encoder_ref: str,
        *,
        seed: int,
        batch_size: int,
        encoder_batch_size: int,
        num_threads: int | None,
        cache_dir: str | None,
        scorer: dict[str, Any] | None = None,
    ):
        set_threads(num_threads)
        self.cfg = rewrite
        self.gen = build_generator(dict(rewrite, seed=seed), batch_size=batch_size, cache_dir=cache_dir)
        self.base_params = self.gen.inner.params
        self.encoder = Encoder(encoder_ref, batch_size=encoder_batch_size)
        # The label check's reward model (ScoreActor kwargs: the current r^{t-1}); None: no check.
        self.scorer = None
        if scorer is not None:
            from mars_ray.stages.score import ScoreActor

            self.scorer = ScoreActor(**{**scorer, "num_threads": None})

    def _margins(self, prompts, chosen, rejected) -> np.ndarray:
        assert self.scorer is not None
        n = len(prompts)
        batch = {
            "pair_id": np.array([str(i) for i in range(n)], dtype=object),
            "prompt": np.array(prompts, dtype=object),
            "chosen": np.array(chosen, dtype=object),
            "rejected": np.array(rejected, dtype=object),
        }
        return np.asarray(self.scorer(batch)["margin"], dtype=np.float64)

    def _rewrite(self, reqs):
        """Rewrites for (role, prompt, chosen, rejected, first attempt, count) requests: one
        generate call per distinct (first attempt, count), all roles together; each request
        gets ``count`` samples, its attempts first .. first + count - 1."""
        out: list[list[str | None]] = [[] for _ in reqs]
        for first, count in sorted({(r[4], r[5]) for r in reqs}):
            idx = [j for j, r in enumerate(reqs) if (r[4], r[5]) == (first, count)]
            # A distinct, reproducible sampling seed (and cache key) per first attempt.
            self.gen.inner.params = dataclasses.replace(self.base_params, seed=self.base_params.seed + first)
            msgs = [
                render(f"rewrite_{reqs[j][0]}", prompt=reqs[j][1], chosen=reqs[j][2], rejected=reqs[j][3]) for j in idx
            ]
            # A rewrite is a response of about the same size: cap each output at twice its source
            # (sampled small models otherwise ramble to max_new_tokens).
            caps = [
                output_cap(
                    reqs[j][2] if reqs[j][0] == "chosen" else reqs[j][3], 2.0, self.cfg["max_new_tokens"], floor=64
                )
                for j in idx
            ]
            for j, row in zip(idx, self.gen.generate(msgs, n=count, max_new_tokens=caps)):
                out[j] = [clean_generation(t) or None if t is not None else None for t in row]
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        before = self.gen.stats.as_dict()
        items = [
            RefineItem(p, c, r, float(d))
            for p, c, r, d in zip(
                as_list(batch["prompt"]),
                as_list(batch["chosen"]),
                as_list(batch["rejected"]),
                as_list(batch["distance"]),
            )
        ]
        res = refine_batch(
            items,
            rewrite=self._rewrite,
            distance=self.encoder.distances,
            harmful=introduced_harm,
            preference=self._margins if self.scorer is not None else None,
            max_rejected=self.cfg["max_attempts_rejected"],
            max_chosen=self.cfg["max_attempts_chosen"],
            schedule=refine_schedule(self.cfg),
        )
        return {
            "pair_id": batch["pair_id"],
            "refined_chosen": np.array([o.chosen for o in res], dtype=object),
            "refined_rejected": np.array([o.rejected for o in res], dtype=object),
            "refined_distance": np.array([o.distance for o in res], dtype=np.float64),
            "refine_status": np.array([o.status for o in res], dtype=object),
            "refine_attempts": np.array([o.attempts for o in res], dtype=np.int64),
            "refine_label_flips": np.array([o.label_flips for o in res], dtype=np.int64),
            **self._stats_columns(len(res), before),
        }


class ParaphraseActor(_StatsMixin):
    """n paraphrases per text, each through the quality gate; kept texts and rejection reasons."""

    def __init__(
        self,
        paraphrase: dict[str, Any],
        encoder_ref: str,
        *,
        batch_size: int,
        encoder_batch_size: int,
        num_threads: int | None,
        cache_dir: str | None,
        seed: int,
    ):
        set_threads(num_threads)
        self.cfg, self.seed = paraphrase, int(seed)
        self.gen = build_generator(dict(paraphrase, seed=seed), batch_size=batch_size, cache_dir=cache_dir)
        self.encoder = Encoder(encoder_ref, batch_size=encoder_batch_size)

    def output_cap(self, text: str) -> int:
        """The gate rejects paraphrases longer than ``max_length_ratio`` times the source, so
        generating past that is wasted."""
        return output_cap(text, self.cfg["max_length_ratio"], self.cfg["max_new_tokens"])

    def request(self, text: str):
        if self.cfg["backend"] == "seq2seq":
            return f"paraphrase: {text}"
        return render("paraphrase", text=text)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        before = self.gen.stats.as_dict()
        texts = as_list(batch["text"])
        ns = [int(n) for n in as_list(batch["n"])]
        caps = [self.output_cap(t) for t in texts]
        kept, reasons = self._gate(texts, self._generate(self.gen, texts, ns, caps))
        retried = [0] * len(texts)
        # Texts left short by the gate: sample again in this actor (model already loaded).
        for rnd in range(1, int(self.cfg.get("retry_rounds", 0)) + 1):
            short = [i for i, k in enumerate(ns) if len(kept[i]) < k]
            if not short:
                break
            sampler = self.gen.with_params(
                temperature=float(self.cfg["topup_temperature"]), num_beams=1, seed=self.seed * 1000 + 500 + rnd
            )
            sub = [texts[i] for i in short]
            over = int(self.cfg.get("retry_oversample", 1))
            more, why = self._gate(
                sub,
                self._generate(sampler, sub, [(ns[i] - len(kept[i])) * over for i in short], [caps[i] for i in short]),
                exclude=[kept[i] for i in short],
            )
            for j, i in enumerate(short):
                need = ns[i] - len(kept[i])
                kept[i] += more[j][:need]
                if len(more[j]) > need:  # passed the gate, not needed: counted, so every candidate is
                    why[j]["surplus"] = why[j].get("surplus", 0) + len(more[j]) - need
                retried[i] += 1
                for r, c in why[j].items():
                    reasons[i][r] = reasons[i].get(r, 0) + c
        return {
            "key": batch["key"],
            "kept": np.array([json.dumps(k, ensure_ascii=False) for k in kept], dtype=object),
            "rejected_reasons": np.array([json.dumps(r) for r in reasons], dtype=object),
            "retry_rounds": np.array(retried, dtype=np.int64),
            **self._stats_columns(len(texts), before),
        }

    def _generate(
        self, gen: CachedGenerator, texts: list[str], ns: list[int], caps: list[int]
    ) -> list[list[str | None]]:
        """n outputs per text, one generate call per distinct n (each text keeps its own cap)."""
        raw: list[list[str | None]] = [[] for _ in texts]
        for n in sorted(set(ns)):
            idx = [i for i, k in enumerate(ns) if k == n]
            outs = gen.generate([self.request(texts[i]) for i in idx], n, max_new_tokens=[caps[i] for i in idx])
            for i, o in zip(idx, outs):
                raw[i] = o
        return raw

    def _gate(self, texts: list[str], raw: list[list[str | None]], exclude: list[list[str]] | None = None):
        cands = [(i, clean_generation(t)) for i, outs in enumerate(raw) for t in outs if t is not None]
        failed = [sum(1 for t in outs if t is None) for outs in raw]
        sims = self.encoder.similarity([texts[i] for i, _ in cands], [c for _, c in cands]) if cands else np.zeros(0)
        kept: list[list[str]] = [[] for _ in texts]
        reasons: list[Counter] = [Counter() for _ in texts]
        for (i, cand), sim in zip(cands, sims):
            why = paraphrase_rejection(
                texts[i],
                cand,
                min_length_ratio=self.cfg["min_length_ratio"],
                max_length_ratio=self.cfg["max_length_ratio"],
                max_copy_similarity=self.cfg["max_copy_similarity"],
                min_semantic_similarity=self.cfg["min_semantic_similarity"],
                semantic_similarity=float(sim),
            )
            if why is None and (cand in kept[i] or (exclude is not None and cand in exclude[i])):
                why = "duplicate"
            if why:
                reasons[i][why] += 1
            else:
                kept[i].append(cand)
        for i, f in enumerate(failed):
            if f:
                reasons[i]["generation_failed"] += f
        return kept, [dict(r) for r in reasons]
