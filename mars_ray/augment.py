"""One epoch of MARS data work (Algorithm 1, steps 1-6), as a pipeline of Ray Data stages.

    score margins -> allocate budget -> semantic labels -> refine low-distance pairs
                  -> paraphrase -> sample pools -> synthetic pairs with lineage

The driver holds only per-pair numbers and the texts it must assemble; models live in actors.
What a strategy changes is decided here and nowhere else:

=============  ==========  ==============  ===================
strategy       margins     allocation      semantic + refine
=============  ==========  ==============  ===================
mars           yes         mars.allocation yes
mars-nosem     yes         mars.allocation no
uniform        no          uniform         no
none           (no augmentation at all)
=============  ==========  ==============  ===================
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.bank import bank_counts
from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.core.allocation import (
    allocation_diagnostics,
    allocation_weights,
    integer_budgets,
    priority_order,
    reserve_pairs,
    split_counts,
)
from mars_ray.core.audit import audit_examples, audit_markdown, audit_operations
from mars_ray.core.pairs import draw_synthetic_pairs, fit_budgets, pool_capacity
from mars_ray.core.semantic import semantic_labels

AUGMENTING = ("mars", "mars-nosem", "uniform")


@dataclass
class EpochResult:
    synthetic: pa.Table  # PAIR_SCHEMA rows, origin "synthetic", with lineage
    per_pair: pa.Table  # one row per original pair: margin, q, budget, distance, refine status, ...
    summary: dict[str, Any] = field(default_factory=dict)


_EPOCH_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("epoch_label", default="[augment]")


@contextlib.contextmanager
def _stage(
    name: str, times: dict[str, float], log: Callable[[str], None], total: int | None = None, unit: str = "rows"
):
    """One stage of the epoch: its line on the console (a bar on a terminal) and its time in
    ``times`` (``augment_summary.json``'s stage_seconds)."""
    from mars_ray import console

    t0 = time.perf_counter()
    try:
        with console.stage(f"{_EPOCH_LABEL.get()} {name}", total=total, unit=unit) as st:
            yield st
    finally:
        times[name] = round(time.perf_counter() - t0, 3)


def run_epoch(
    cfg: Config,
    pairs: pa.Table,
    *,
    reward_ref: str,
    epoch: int,
    log: Callable[[str], None] = print,
    label: str | None = None,
    margins: pa.Table | None = None,
) -> EpochResult:
    """Synthetic pairs for one epoch from the original ``pairs`` (PAIR_SCHEMA, train split).

    ``label`` starts each stage's console line (default ``[epoch N]``). ``margins`` (pair_id,
    margin): the pairs' margins under ``reward_ref`` when already scored (by the training run that
    produced it); else a scoring pool scores them.

    Raises:
        ValueError: a strategy that does not augment through this pipeline.
    """
    from mars_ray.generation.cache import choose_backend
    from mars_ray.models.resolve import cache_root

    # How model.cache_dir keeps its generation cache, decided here before any actor opens it.
    choose_backend(cache_root(cfg.model.cache_dir), cfg.model.cache_backend)
    token = _EPOCH_LABEL.set(label or f"[epoch {epoch}]")
    try:
        return _run_epoch(cfg, pairs, reward_ref=reward_ref, epoch=epoch, log=log, margins=margins)
    finally:
        _EPOCH_LABEL.reset(token)


def _run_epoch(
    cfg: Config, pairs: pa.Table, *, reward_ref: str, epoch: int, log: Callable[[str], None], margins: pa.Table | None
) -> EpochResult:
    from mars_ray.runtime import init_ray

    strategy = cfg.mars.strategy
    if strategy not in AUGMENTING + ("none",):
        raise ValueError(f"mars.strategy={strategy} does not augment with paraphrases; `mars-ray train` runs it")
    rng = np.random.default_rng([cfg.seed, epoch])
    n = pairs.num_rows
    times: dict[str, float] = {}
    ids = pairs.column(S.PAIR_ID).to_pylist()
    per_pair: dict[str, Any] = {S.PAIR_ID: ids}
    summary: dict[str, Any] = {"epoch": epoch, "strategy": strategy, "pairs": n, "budget": cfg.mars.budget}
    if strategy == "none" or cfg.mars.budget == 0 or n == 0:
        summary.update(synthetic=0, stage_seconds=times)
        return EpochResult(pa.Table.from_pylist([], schema=S.PAIR_SCHEMA), pa.table(per_pair), summary)
    init_ray(cfg.resources)

    # 1. Margins with r^{t-1}.
    scored = margins
    margins = np.zeros(n)
    if strategy != "uniform":
        from mars_ray.stages.score import score_margins

        with _stage("score margins", times, log, total=n, unit="pairs") as st:
            where = " (scored by the training run)" if scored is not None else ""
            if scored is None:
                scored = score_margins(pairs, model_ref=reward_ref, cfg=cfg)
            margins = _align(ids, scored, "margin")
            st.done(
                f"margin mean {margins.mean():+.3f}, std {margins.std():.3f}; "
                f"{np.mean(margins < 0):.0%} mis-ranked{where}"
            )
        per_pair["margin"] = margins

    # 2. Allocation.
    mode = "uniform" if strategy == "uniform" else cfg.mars.allocation
    q = allocation_weights(margins, cfg.mars.tau, mode, cfg.mars.margin_scale)
    b = integer_budgets(q, cfg.mars.budget, rng)
    # Equal weights (all of them under uniform) are ordered at random under the seed wherever
    # pairs are picked in order of q: the reserve, the shortfall moves and the top-up rounds.
    tiebreak = rng.permutation(n)
    per_pair.update(q=q, budget=b)
    diagnostics = allocation_diagnostics(q, b, margins if strategy != "uniform" else None)
    if strategy != "uniform":
        log(
            f"{_EPOCH_LABEL.get()} allocation of {cfg.mars.budget} synthetic pairs: effective sample size "
            f"{diagnostics['ess_ratio']:.2f} x N (1 = uniform); the lowest-margin 10% of pairs hold "
            f"{diagnostics['q_share_lowest_decile']:.0%} of q"
        )

    # 3-4. Semantic labels and refinement of low-distance pairs that may receive budget: those
    # with budget and the reserve (reserve_pairs); pairs a top-up round reaches are refined there.
    # Every pair that ends up with synthetic pairs has been through the semantic step.
    chosen = np.array(pairs.column(S.CHOSEN).to_pylist(), dtype=object)
    rejected = np.array(pairs.column(S.REJECTED).to_pylist(), dtype=object)
    check = cfg.rewrite.label_check
    if check == "auto":
        check = "reward" if epoch > 1 or cfg.mars.warmup_passes > 0 else "none"
    sem = _Semantic(cfg, pairs, ids, chosen, rejected, per_pair, times, log, reward_ref=reward_ref, label_check=check)
    reserve = reserve_pairs(b, q, cfg.paraphrase.reserve, tiebreak)
    if strategy == "mars" and not cfg.semantic.active(cfg.rewrite.model):
        why = (
            "semantic.enabled false"
            if cfg.semantic.enabled is False
            else f"the built-in rewriter {cfg.rewrite.model} fails the rewrite quality figure (docs/results.md); "
            "set semantic.enabled true, or a capable rewrite.model"
        )
        summary["semantic"] = {"off": why}
        if epoch == 1:
            log(f"{_EPOCH_LABEL.get()} semantic step off: {why}")
    elif strategy == "mars":
        summary["semantic"] = sem.label()
        summary["semantic"]["low_with_budget"] = int((sem.low & (b > 0)).sum())
        summary["semantic"]["low_in_reserve"] = int((sem.low & (reserve > 0)).sum())
        sem.refine((b > 0) | (reserve > 0), "first round")

    # 5. Paraphrases of the (refined) responses, plus the reserve's rejected responses.
    n_plus, n_minus = split_counts(b)
    gen_stats = sem.gen_stats
    refined, status = sem.refined, sem.status
    kept_c, kept_r, para = _paraphrase(cfg, ids, chosen, rejected, n_plus, n_minus + reserve, gen_stats, times, log)
    para["reserve_texts"] = int(reserve.sum())
    summary["paraphrase"] = para

    # 6. Pools -> exactly B synthetic pairs. When the quality gate left the pools too small, top-up
    # rounds ask one more paraphrase per side (further down each text's bank walk) for the pairs
    # with the largest allocation weight until the budget fits or the rounds run out.
    def fit():
        cap = np.array([pool_capacity(len(kept_c[i]), len(kept_r[i]), bool(refined[i])) for i in range(n)])
        return fit_budgets(b, cap, q, tiebreak)

    b_fit, unspent = fit()
    para["topup_rounds"] = []
    for rnd in range(1, cfg.paraphrase.topup_rounds + 1):
        if unspent == 0:
            break
        order = priority_order(q, tiebreak)
        extra = np.zeros(n, dtype=np.int64)
        extra[order[: min(n, 2 * unspent)]] = 1  # twice the shortfall: about half pass the gate
        sem.refine(extra > 0, f"top-up {rnd}")
        # One more paraphrase per side: the bank walk for (text, kept + 1) repeats the cached
        # candidates and continues past them, so its answer extends what the pair already has.
        want_c = np.where(extra > 0, [len(k) + 1 for k in kept_c], 0)
        want_r = np.where(extra > 0, [len(k) + 1 for k in kept_r], 0)
        more_c, more_r, info = _paraphrase(cfg, ids, chosen, rejected, want_c, want_r, gen_stats, times, log, topup=rnd)
        for i in np.flatnonzero(extra):
            kept_c[i], kept_r[i] = more_c[i], more_r[i]
        info["extra_asked"] = int(2 * extra.sum())
        b_fit, unspent = fit()
        para["topup_rounds"].append({**info, "unspent_after": unspent})
    prompts = pairs.column(S.PROMPT).to_pylist()
    subsets = pairs.column(S.SUBSET).to_pylist()
    refined_by = f"rewrite={cfg.rewrite.model};paraphrase={cfg.paraphrase.model}"
    rows = draw_synthetic_pairs(
        pair_ids=ids,
        prompts=prompts,
        subsets=subsets,
        chosen=chosen,
        rejected=rejected,
        kept_chosen=kept_c,
        kept_rejected=kept_r,
        budgets=b_fit,
        refined=refined,
        q=q,
        seed=cfg.seed,
        epoch=epoch,
        generator=cfg.paraphrase.model,
        refined_generator=refined_by,
        margins=pairs.column(S.MARGIN).to_pylist() if S.MARGIN in pairs.column_names else None,
    )
    para["reserve_used"] = int(((b_fit > 0) & (reserve > 0)).sum())
    if sem.ref:
        summary["refine"] = sem.ref
    per_pair.update(reserve=reserve, budget_spent=b_fit, refine_status=status)
    synthetic = pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA)
    summary.update(
        synthetic=synthetic.num_rows,
        budget_unspent=unspent,
        operations=dict(Counter(r[S.OPERATION] for r in rows)),
        allocation=_allocation_summary(margins if strategy != "uniform" else None, q, b),
        diagnostics={
            **diagnostics,
            "gate_pass_rate": _gate_pass_rate(para),
        },
        generation=dict(gen_stats),
        bank=bank_counts(dict(gen_stats)),
        audit={
            "operations": audit_operations(para, sem.audit),
            "examples": audit_examples(
                rows,
                pairs.select([S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED]).to_pylist(),
                np.random.default_rng([cfg.seed, epoch, 1]),
            ),
        },
        stage_seconds=times,
    )
    return EpochResult(synthetic, pa.table(per_pair), summary)


def _check_failures(cfg: Config, operation: str, out: pa.Table, generator: str) -> None:
    """Fail the epoch when a stage's generations failed more often than augment.max_failure_rate."""
    from mars_ray.generation import check_failure_rate

    if out.num_rows == 0 or "gen_failed" not in out.column_names:
        return
    generated = int(np.sum(out.column("gen_generated").to_numpy()))
    failed = int(np.sum(out.column("gen_failed").to_numpy()))
    check_failure_rate(operation, generated, failed, cfg.augment.max_failure_rate, generator)


def _align(ids: list[str], table: pa.Table, column: str) -> np.ndarray:
    """``table[column]`` in the order of ``ids`` (every id must be present exactly once)."""
    got = dict(zip(table.column("pair_id").to_pylist(), table.column(column).to_pylist()))
    missing = [i for i in ids if i not in got]
    if missing or len(got) != len(ids):
        raise RuntimeError(f"stage returned {len(got)} of {len(ids)} pairs (missing e.g. {missing[:3]})")
    return np.array([got[i] for i in ids], dtype=np.float64)


class _Semantic:
    """The semantic step of one epoch: distances once, then refinement of the low-distance pairs
    among any set of pairs, each pair at most once (its rewrite replaces ``chosen``/``rejected``)."""

    def __init__(self, cfg, pairs, ids, chosen, rejected, per_pair, times, log, *, reward_ref: str, label_check: str):
        self.cfg, self.pairs, self.ids, self.per_pair, self.times, self.log = cfg, pairs, ids, per_pair, times, log
        self.reward_ref, self.label_check = reward_ref, label_check
        self.chosen, self.rejected = chosen, rejected
        n = len(ids)
        self.refined = np.zeros(n, dtype=bool)
        self.status = np.full(n, "", dtype=object)
        self.attempted = np.zeros(n, dtype=bool)
        self.low = np.zeros(n, dtype=bool)
        self.dist: np.ndarray | None = None
        self.gen_stats: Counter = Counter()
        self.ref: dict[str, Any] = {}
        self.audit: dict[str, Counter] = {}  # rewrite outputs by operation and what became of them

    def label(self) -> dict[str, Any]:
        from mars_ray.stages.embed import semantic_distances

        with _stage("semantic distances", self.times, self.log, total=len(self.ids), unit="pairs"):
            self.dist = _align(self.ids, semantic_distances(self.pairs, self.cfg), "distance")
        self.low, threshold = semantic_labels(self.dist, self.cfg.semantic.threshold)
        self.per_pair.update(distance=self.dist.copy(), low_distance=self.low, distance_after=self.dist)
        return {"threshold": threshold, "low": int(self.low.sum()), "high": int((~self.low).sum())}

    def refine(self, mask: np.ndarray, why: str) -> None:
        """Rewrite the low-distance pairs of ``mask`` not attempted yet (nothing before :meth:`label`)."""
        from mars_ray.stages.common import map_with_actors
        from mars_ray.stages.generate import STAT_COLUMNS, RefineActor, refine_actor_kwargs
        from mars_ray.stages.score import actor_kwargs

        if self.dist is None:
            return
        todo = np.flatnonzero(self.low & np.asarray(mask, dtype=bool) & ~self.attempted)
        by_round = self.ref.setdefault("candidates_by_round", {})
        by_round[why] = int(todo.size)
        self.ref["candidates"] = self.ref.get("candidates", 0) + int(todo.size)
        if not todo.size:
            return
        self.attempted[todo] = True
        cfg, dist = self.cfg, self.dist
        sub = self.pairs.take(pa.array(todo)).select([S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED])
        sub = sub.append_column("distance", pa.array(dist[todo]))
        scorer = actor_kwargs(self.reward_ref, cfg, num_threads=None) if self.label_check == "reward" else None
        kwargs = refine_actor_kwargs(cfg, scorer)
        with _stage(
            f"refine low-distance pairs ({why})", self.times, self.log, total=int(todo.size), unit="pairs"
        ) as st:
            out = map_with_actors(
                sub,
                RefineActor,
                kwargs,
                resources=cfg.resources,
                batch_size=cfg.rewrite.batch(cfg.resources.gpus_per_actor),
            )
            _check_failures(cfg, f"refine ({why})", out, f"{cfg.rewrite.backend}:{cfg.rewrite.model}")
            by_id = {r["pair_id"]: r for r in out.to_pylist()}
            st.done(f"{sum(str(r['refine_status']).startswith('rewrote') for r in by_id.values())} rewritten")
        for i in todo:
            r = by_id[self.ids[i]]
            self.status[i] = r["refine_status"]
            if r["refine_status"].startswith("rewrote"):
                self.refined[i] = True
                self.chosen[i], self.rejected[i] = r["refined_chosen"], r["refined_rejected"]
                dist[i] = r["refined_distance"]
        for c in STAT_COLUMNS:
            self.gen_stats[f"rewrite_{c.removeprefix('gen_')}"] += int(np.sum(out.column(c).to_numpy()))
        for a in out.column("refine_audit").to_pylist():
            for key, v in json.loads(a).items():
                role, what = key.split(":", 1)
                self.audit.setdefault(f"rewrite-{role}", Counter())[what] += int(v)
        tried = self.attempted.sum()
        self.ref.update(
            refined=int(self.refined.sum()),
            retention=float(self.refined.sum() / tried),
            by_status=dict(Counter(self.status[self.attempted])),
            rewrite_calls=self.ref.get("rewrite_calls", 0) + int(np.sum(out.column("refine_attempts").to_numpy())),
            label_check=self.label_check,
            label_flips_rejected=self.ref.get("label_flips_rejected", 0)
            + int(np.sum(out.column("refine_label_flips").to_numpy())),
        )


def _paraphrase(cfg, ids, chosen, rejected, n_plus, n_minus, gen_stats, times, log, topup: int = 0):
    from mars_ray.stages.common import map_with_actors
    from mars_ray.stages.generate import STAT_COLUMNS, ParaphraseActor, longest_first, paraphrase_actor_kwargs

    n = len(ids)
    keys, texts, counts = [], [], []
    for i in range(n):
        for side, text, k in (("c", chosen[i], n_plus[i]), ("r", rejected[i], n_minus[i])):
            if k > 0:
                keys.append(f"{i}:{side}")
                texts.append(text)
                counts.append(int(k))
    kept_c: list[list[str]] = [[] for _ in range(n)]
    kept_r: list[list[str]] = [[] for _ in range(n)]
    info: dict[str, Any] = {"texts": len(texts), "requested": int(sum(counts))}
    if not texts:
        return kept_c, kept_r, info
    req = longest_first(pa.table({"key": keys, "text": texts, "n": counts}))
    kwargs = paraphrase_actor_kwargs(cfg)
    label = f"paraphrase top-up {topup}" if topup else "paraphrase"
    with _stage(label, times, log, total=len(texts), unit="texts") as st:
        out = map_with_actors(
            req,
            ParaphraseActor,
            kwargs,
            resources=cfg.resources,
            batch_size=cfg.paraphrase.batch(cfg.resources.gpus_per_actor),
        )
        _check_failures(cfg, label, out, f"{cfg.paraphrase.backend}:{cfg.paraphrase.model}")
        reasons: Counter = Counter()
        kept_total = 0
        for row in out.select(["key", "kept", "rejected_reasons"]).to_pylist():
            i, side = row["key"].split(":")
            kept = json.loads(row["kept"])
            kept_total += len(kept)
            (kept_c if side == "c" else kept_r)[int(i)].extend(kept)
            reasons.update(json.loads(row["rejected_reasons"]))
        st.done(f"{kept_total} of {int(sum(counts))} paraphrases passed the gate")
    for c in STAT_COLUMNS:
        gen_stats[f"paraphrase_{c.removeprefix('gen_')}"] += int(np.sum(out.column(c).to_numpy()))
    retried = out.column("retry_rounds").to_numpy() if "retry_rounds" in out.column_names else np.zeros(0)
    info.update(
        kept=kept_total,
        filtered=dict(reasons),
        filtered_total=int(sum(reasons.values())),
        texts_resampled=int(np.sum(retried > 0)),
        resample_rounds=int(np.sum(retried)),
    )
    return kept_c, kept_r, info


def _gate_pass_rate(para: dict[str, Any]) -> float | None:
    """Paraphrase candidates that passed the quality gate / candidates judged, over every round
    (surplus candidates passed but were not needed; failed generations were never judged)."""
    rounds = [para, *para.get("topup_rounds", [])]
    passed = judged = 0
    for r in rounds:
        filtered = r.get("filtered", {})
        passed += int(r.get("kept", 0)) + int(filtered.get("surplus", 0))
        judged += int(r.get("kept", 0)) + sum(int(v) for k, v in filtered.items() if k != "generation_failed")
    return passed / judged if judged else None


def _allocation_summary(margins: np.ndarray | None, q: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Budget by margin decile (how much went to the lowest-margin pairs) and concentration."""
    out: dict[str, Any] = {"pairs_with_budget": int((b > 0).sum()), "max_budget": int(b.max()), "q_max": float(q.max())}
    if margins is not None and margins.size >= 2:
        order = np.argsort(margins, kind="stable")
        bins = np.array_split(order, min(10, margins.size))
        out["by_margin_decile"] = [
            {"margin_lo": float(margins[ix].min()), "margin_hi": float(margins[ix].max()), "budget": int(b[ix].sum())}
            for ix in bins
        ]
        out["margin"] = {
            "mean": float(margins.mean()),
            "std": float(margins.std()),
            "negative": int((margins < 0).sum()),
        }
    return out


def diagnostics_text(d: dict[str, Any]) -> str:
    """One line: how far q was from uniform and where the budget went."""

    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    parts = [f"ESS/N {d['ess_ratio']:.3f}" if d.get("ess_ratio") is not None else "ESS/N n/a"]
    if d.get("margin_std") is not None:
        parts.append(f"margin {d['margin_mean']:+.3f} ± {d['margin_std']:.3f}")
    parts += [
        f"budget on mis-ranked pairs {pct(d.get('budget_share_misranked'))}",
        f"on the lowest-margin decile {pct(d.get('budget_share_lowest_decile'))}",
        f"max b_i {d.get('max_budget')}",
        f"gate pass rate {pct(d.get('gate_pass_rate'))}",
    ]
    return ", ".join(parts)


def summary_markdown(summary: dict[str, Any]) -> str:
    """A short human-readable account of one epoch."""
    lines = [
        f"# MARS augmentation, epoch {summary['epoch']} ({summary['strategy']})",
        "",
        f"- original pairs: {summary['pairs']}; budget: {summary['budget']}; synthetic pairs: {summary['synthetic']}"
        + (f"; unspent: {summary['budget_unspent']}" if summary.get("budget_unspent") else ""),
    ]
    if "operations" in summary:
        lines.append("- operations: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["operations"].items())))
    sem, ref = summary.get("semantic"), summary.get("refine")
    if sem and sem.get("off"):
        lines.append(f"- semantic step off: {sem['off']}")
    elif sem:
        lines.append(
            f"- semantic: threshold {sem['threshold']:.3f}, low {sem['low']}, high {sem['high']}, low with budget {sem['low_with_budget']}"
        )
    if ref and ref.get("candidates"):
        lines.append(
            f"- refinement: {ref['refined']} of {ref['candidates']} refined (retention {ref['retention']:.0%}); "
            + ", ".join(f"{k} {v}" for k, v in ref["by_status"].items())
        )
    para = summary.get("paraphrase")
    if para and para.get("texts"):
        lines.append(
            f"- paraphrases: requested {para['requested']}, kept {para.get('kept', 0)}, filtered "
            + (", ".join(f"{k} {v}" for k, v in sorted(para.get("filtered", {}).items())) or "none")
            + (
                f"; {para['texts_resampled']} texts resampled in the actor ({para['resample_rounds']} rounds)"
                if para.get("texts_resampled")
                else ""
            )
        )
    for r in (para or {}).get("topup_rounds", []):
        lines.append(
            f"- paraphrase top-up: requested {r['requested']}, kept {r.get('kept', 0)}, unspent after {r['unspent_after']}"
        )
    if summary.get("generation"):
        lines.append("- generation: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["generation"].items())))
    if summary.get("bank"):
        b = summary["bank"]
        lines.append(
            f"- generation bank: {b['hits']} hits, {b['misses']} misses ({b['generated']} generated, {b['failed']} failed"
            + (f", {b['corrupt']} corrupt entries regenerated" if b.get("corrupt") else "")
            + ")"
        )
    diag = summary.get("diagnostics")
    if diag:
        lines.append("- allocation diagnostics: " + diagnostics_text(diag))
    if summary.get("audit", {}).get("operations"):
        lines += ["", "## Synthetic data audit", ""] + audit_markdown(summary["audit"])
    alloc = summary.get("allocation", {})
    if "by_margin_decile" in alloc:
        lines += ["", "| margin decile | margin range | budget |", "|---|---|---|"]
        for k, d in enumerate(alloc["by_margin_decile"], 1):
            lines.append(f"| {k} | {d['margin_lo']:+.3f} … {d['margin_hi']:+.3f} | {d['budget']} |")
    if summary.get("stage_seconds"):
        lines += ["", "| stage | seconds |", "|---|---|"] + [
            f"| {k} | {v:.1f} |" for k, v in summary["stage_seconds"].items()
        ]
    return "\n".join(lines) + "\n"
