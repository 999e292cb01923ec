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

from mars_ray.config import Config
from mars_ray.core import chaos
from mars_ray.core.filters import (
    clean_generation,
    introduced_harm,
    judge_rewrite,
    last_human_turn,
    paraphrase_rejection,
)
from mars_ray.core.refine import RefineItem, Role, refine_batch
from mars_ray.generation import CachedGenerator, GenParams, LazyGenerator, default_cache
from mars_ray.generation.prompts import load_prompt, render
from mars_ray.stages.common import as_list, set_threads
from mars_ray.stages.embed import Encoder, encoder_settings

STAT_COLUMNS = ("gen_requested", "gen_hits", "gen_generated", "gen_failed", "gen_corrupt")


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
        seed=int(section.get("gen_seed", 0)),
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
        from mars_ray.runtime import pick_device

        device = pick_device()  # the GPU this actor reserved, else the CPU
        dtype = generation_dtype(section.get("dtype", "auto"), device)
        openai_kwargs["dtype"] = dtype
        openai_kwargs["device"] = device
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


def paraphrase_actor_kwargs(cfg: Config) -> dict[str, Any]:
    """Everything a :class:`ParaphraseActor` needs, as plain values (no config object is captured)."""
    from mars_ray.stages.common import actor_threads

    return dict(
        paraphrase=dataclasses.asdict(cfg.paraphrase),
        encoder=encoder_settings(cfg),
        batch_size=cfg.paraphrase.batch(cfg.resources.gpus_per_actor),
        num_threads=actor_threads(cfg.resources),
        cache_dir=cfg.model.cache_dir,
    )


def refine_actor_kwargs(cfg: Config, scorer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a :class:`RefineActor` needs; ``scorer``: the label check's ScoreActor kwargs."""
    from mars_ray.stages.common import actor_threads

    return dict(
        rewrite=dataclasses.asdict(cfg.rewrite),
        encoder=encoder_settings(cfg),
        batch_size=cfg.rewrite.batch(cfg.resources.gpus_per_actor),
        num_threads=actor_threads(cfg.resources),
        cache_dir=cfg.model.cache_dir,
        scorer=scorer,
    )


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
        encoder: dict[str, Any],
        *,
        batch_size: int,
        num_threads: int | None,
        cache_dir: str | None,
        scorer: dict[str, Any] | None = None,
    ):
        set_threads(num_threads)
        self.cfg = rewrite
        self.gen = build_generator(rewrite, batch_size=batch_size, cache_dir=cache_dir)
        self.encoder = Encoder(**encoder, cache_dir=cache_dir, cache=True)
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
        generate call per distinct (first attempt, count), all roles together; attempt a of a
        request is its output slot a - 1 (a sampled slot has its own seed), so an attempt is the
        same text whichever schedule asked for it, and is shared through the cache by every run."""
        out: list[list[str | None]] = [[] for _ in reqs]
        sampled = float(self.cfg["temperature"]) > 0
        for first, count in sorted({(r[4], r[5]) for r in reqs}):
            idx = [j for j, r in enumerate(reqs) if (r[4], r[5]) == (first, count)]
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
            if sampled:
                rows = self.gen.generate(msgs, n=count, max_new_tokens=caps, first_slot=first - 1)
            else:  # deterministic rewrites: attempts are the slots of one (first - 1 + count)-output call
                rows = [r[first - 1 :] for r in self.gen.generate(msgs, n=first - 1 + count, max_new_tokens=caps)]
            for j, row in zip(idx, rows):
                out[j] = list(row)
        return out

    def _gate(self, cands: list[tuple[Role, RefineItem, str]]) -> list[tuple[str | None, str | None]]:
        """Raw outputs -> (reply, None) or (None, reason): markers parsed strictly when the
        template asks for them, then :func:`rewrite_rejection` with the topic similarity of each
        reply to its conversation's last human turn (one encoder call for the batch)."""
        verdicts = [
            judge_rewrite(
                raw,
                role=role,
                prompt=it.prompt,
                chosen=it.chosen,
                rejected=it.rejected,
                template_wording=load_prompt(f"rewrite_{role}").wording,
                min_length_ratio=self.cfg["min_length_ratio"],
                max_length_ratio=self.cfg["max_length_ratio"],
            )
            for role, it, raw in cands
        ]
        floor = self.cfg.get("min_topic_similarity")
        live = [k for k, (_, why) in enumerate(verdicts) if why is None]
        if floor is not None and live:
            sims = self.encoder.similarity(
                [last_human_turn(cands[k][1].prompt) for k in live], [str(verdicts[k][0]) for k in live]
            )
            for k, sim in zip(live, sims):
                if float(sim) < float(floor):
                    verdicts[k] = (None, "off_topic")
        return verdicts

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
            gate=self._gate if self.cfg.get("gate", True) else _clean_only,
            max_rejected=self.cfg["max_attempts_rejected"],
            max_chosen=self.cfg["max_attempts_chosen"],
            schedule=refine_schedule(self.cfg),
        )
        chaos.point("refine.batch")  # generated and cached, not yet returned
        return {
            "pair_id": batch["pair_id"],
            "refined_chosen": np.array([o.chosen for o in res], dtype=object),
            "refined_rejected": np.array([o.rejected for o in res], dtype=object),
            "refined_distance": np.array([o.distance for o in res], dtype=np.float64),
            "refine_status": np.array([o.status for o in res], dtype=object),
            "refine_attempts": np.array([o.attempts for o in res], dtype=np.int64),
            "refine_label_flips": np.array([o.label_flips for o in res], dtype=np.int64),
            "refine_audit": np.array([json.dumps(o.audit) for o in res], dtype=object),
            **self._stats_columns(len(res), before),
        }


def _clean_only(cands: list[tuple[Role, RefineItem, str]]) -> list[tuple[str | None, str | None]]:
    """``rewrite.gate false``: the cleaned output is the candidate; only a blank one is rejected."""
    out: list[tuple[str | None, str | None]] = []
    for _, _, raw in cands:
        t = clean_generation(raw)
        out.append((t, None) if t else (None, "empty"))
    return out


class ParaphraseActor(_StatsMixin):
    """n paraphrases per text, each through the quality gate; kept texts and rejection reasons.

    A text's candidates form one fixed sequence, the text's row in the generation bank: first the
    deterministic outputs (``temperature 0``: the ``max(num_beams, 1)`` outputs of one search;
    none when the section samples), then sampled candidates 0, 1, 2, ... (``topup_temperature``,
    each with its own seed). The kept paraphrases are the first ``n`` candidates that pass the
    gate (duplicates excluded), walked in rounds: the deterministic outputs and enough samples to
    reach ``n``, then up to ``retry_rounds`` rounds of ``retry_oversample`` samples per missing
    paraphrase. So the answer for (text, n) is the same in every epoch, strategy, seed and trial,
    a larger ``n`` extends a smaller one's answer, and the cache makes a repeated walk free.
    """

    def __init__(
        self,
        paraphrase: dict[str, Any],
        encoder: dict[str, Any],
        *,
        batch_size: int,
        num_threads: int | None,
        cache_dir: str | None,
    ):
        set_threads(num_threads)
        self.cfg = paraphrase
        self.gen = build_generator(paraphrase, batch_size=batch_size, cache_dir=cache_dir)
        self.deterministic = max(1, int(paraphrase.get("num_beams", 1))) if float(paraphrase["temperature"]) == 0 else 0
        self.sampler = (
            self.gen.with_params(temperature=float(paraphrase["topup_temperature"]), num_beams=1)
            if self.deterministic
            else self.gen
        )
        self.encoder = Encoder(**encoder, cache_dir=cache_dir, cache=True)

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
        kept: list[list[str]] = [[] for _ in texts]
        reasons: list[dict[str, int]] = [{} for _ in texts]
        want = [i for i, n in enumerate(ns) if n > 0]
        if self.deterministic and want:
            raw = self.gen.generate(
                [self.request(texts[i]) for i in want], self.deterministic, max_new_tokens=[caps[i] for i in want]
            )
            self._take(want, texts, ns, raw, kept, reasons)
        next_slot = [0] * len(texts)
        retried = [0] * len(texts)
        over = max(1, int(self.cfg.get("retry_oversample", 1)))
        for rnd in range(int(self.cfg.get("retry_rounds", 0)) + 1):
            # round 0: the samples that n needs beyond the deterministic outputs; later rounds:
            # retry_oversample samples per paraphrase the gate left missing
            asks: dict[int, int] = {}
            for i in want:
                missing = ns[i] - len(kept[i])
                if missing <= 0:
                    continue
                if rnd == 0:
                    if ns[i] > self.deterministic:
                        asks[i] = ns[i] - self.deterministic
                else:
                    asks[i] = missing * over
                    retried[i] += 1
            groups: dict[tuple[int, int], list[int]] = {}
            for i, k in asks.items():
                groups.setdefault((next_slot[i], k), []).append(i)
            for (first, k), idx in sorted(groups.items()):
                raw = self.sampler.generate(
                    [self.request(texts[i]) for i in idx], k, max_new_tokens=[caps[i] for i in idx], first_slot=first
                )
                self._take(idx, texts, ns, raw, kept, reasons)
                for i in idx:
                    next_slot[i] = first + k
        chaos.point("paraphrase.batch")  # generated, cached and gated, not yet returned
        return {
            "key": batch["key"],
            "kept": np.array([json.dumps(k, ensure_ascii=False) for k in kept], dtype=object),
            "rejected_reasons": np.array([json.dumps(r) for r in reasons], dtype=object),
            "retry_rounds": np.array(retried, dtype=np.int64),
            **self._stats_columns(len(texts), before),
        }

    def _take(self, idx, texts, ns, raw, kept, reasons) -> None:
        """Gate ``raw`` (outputs for the texts ``idx``, in candidate order) and keep, per text, the
        passing candidates it still needs; the rest that pass are counted as surplus."""
        sub_kept, why = self._gate([texts[i] for i in idx], raw, exclude=[kept[i] for i in idx])
        for j, i in enumerate(idx):
            need = max(0, ns[i] - len(kept[i]))
            kept[i] += sub_kept[j][:need]
            if len(sub_kept[j]) > need:  # passed the gate, not needed: counted, so every candidate is
                why[j]["surplus"] = why[j].get("surplus", 0) + len(sub_kept[j]) - need
            for r, c in why[j].items():
                reasons[i][r] = reasons[i].get(r, 0) + c

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
