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
from mars_ray.core.pairs import SyntheticDraw, draw_synthetic_pairs, fit_budgets, pool_capacity
from mars_ray.core.semantic import semantic_labels

AUGMENTING = ("mars", "mars-nosem", "uniform")


@dataclass
class EpochResult:
    synthetic: pa.Table  # PAIR_SCHEMA rows, origin "synthetic", with lineage
    per_pair: pa.Table  # one row per original pair: margin, q, budget, distance, refine status, ...
    summary: dict[str, Any] = field(default_factory=dict)
    loss_weights: np.ndarray | None = None  # one per pair of the current training set (AdaBoost's)


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


@dataclass(frozen=True)
class Plan:
    """What a paraphrase strategy changes in an epoch: whether the budget follows r^{t-1}'s
    margins (else it is spread evenly) and whether the semantic step rewrites close pairs first."""

    strategy: str
    by_margin: bool
    semantic: bool


PLANS = {
    "mars": Plan("mars", by_margin=True, semantic=True),
    "mars-nosem": Plan("mars-nosem", by_margin=True, semantic=False),
    "uniform": Plan("uniform", by_margin=False, semantic=False),
}


def _run_epoch(
    cfg: Config, pairs: pa.Table, *, reward_ref: str, epoch: int, log: Callable[[str], None], margins: pa.Table | None
) -> EpochResult:
    strategy = cfg.mars.strategy
    if strategy not in AUGMENTING + ("none",):
        raise ValueError(f"mars.strategy={strategy} does not augment with paraphrases; `mars-ray train` runs it")
    if strategy == "none" or cfg.mars.budget == 0 or pairs.num_rows == 0:
        summary = {"epoch": epoch, "strategy": strategy, "pairs": pairs.num_rows, "budget": cfg.mars.budget}
        summary.update(synthetic=0, stage_seconds={})
        per_pair = pa.table({S.PAIR_ID: pairs.column(S.PAIR_ID).to_pylist()})
        return EpochResult(pa.Table.from_pylist([], schema=S.PAIR_SCHEMA), per_pair, summary)
    from mars_ray.runtime import init_ray

    init_ray(cfg.resources)
    return _Epoch(cfg, pairs, PLANS[strategy], reward_ref=reward_ref, epoch=epoch, log=log).run(margins)


class _Epoch:
    """One epoch of a paraphrase strategy, step by step (Algorithm 1, steps 1-6)."""

    def __init__(self, cfg: Config, pairs: pa.Table, plan: Plan, *, reward_ref: str, epoch: int, log) -> None:
        self.cfg, self.pairs, self.plan, self.reward_ref, self.epoch, self.log = (
            cfg,
            pairs,
            plan,
            reward_ref,
            epoch,
            log,
        )
        self.rng = np.random.default_rng([cfg.seed, epoch])
        self.n = pairs.num_rows
        self.times: dict[str, float] = {}
        self.ids = pairs.column(S.PAIR_ID).to_pylist()
        self.per_pair: dict[str, Any] = {S.PAIR_ID: self.ids}
        self.summary: dict[str, Any] = {
            "epoch": epoch,
            "strategy": plan.strategy,
            "pairs": self.n,
            "budget": cfg.mars.budget,
        }

    def run(self, scored: pa.Table | None) -> EpochResult:
        margins = self.margins(scored)
        q, b, tiebreak, diagnostics = self.allocate(margins)
        sem, reserve = self.semantic_step(q, b, tiebreak)
        kept_c, kept_r, para, b_fit, unspent = self.fill_pools(sem, q, b, tiebreak, reserve)
        rows = self.draw(sem, kept_c, kept_r, b_fit, q)
        para["reserve_used"] = int(((b_fit > 0) & (reserve > 0)).sum())
        if sem.ref:
            self.summary["refine"] = sem.ref
        self.per_pair.update(reserve=reserve, budget_spent=b_fit, refine_status=sem.status)
        synthetic = pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA)
        self.summary.update(
            synthetic=synthetic.num_rows,
            budget_unspent=unspent,
            operations=dict(Counter(r[S.OPERATION] for r in rows)),
            allocation=_allocation_summary(margins if self.plan.by_margin else None, q, b),
            diagnostics={**diagnostics, "gate_pass_rate": _gate_pass_rate(para)},
            generation=dict(sem.gen_stats),
            bank=bank_counts(dict(sem.gen_stats)),
            audit={
                "operations": audit_operations(para, sem.audit),
                "examples": audit_examples(
                    rows,
                    self.pairs.select([S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED]).to_pylist(),
                    np.random.default_rng([self.cfg.seed, self.epoch, 1]),
                ),
            },
            stage_seconds=self.times,
        )
        return EpochResult(synthetic, pa.table(self.per_pair), self.summary)

    # 1. Margins with r^{t-1}.
    def margins(self, scored: pa.Table | None) -> np.ndarray:
        if not self.plan.by_margin:
            return np.zeros(self.n)
        from mars_ray.stages.score import score_margins

        with _stage("score margins", self.times, self.log, total=self.n, unit="pairs") as st:
            where = " (scored by the training run)" if scored is not None else ""
            if scored is None:
                scored = score_margins(self.pairs, model_ref=self.reward_ref, cfg=self.cfg)
            margins = _align(self.ids, scored, "margin")
            st.done(
                f"margin mean {margins.mean():+.3f}, std {margins.std():.3f}; "
                f"{np.mean(margins < 0):.0%} mis-ranked{where}"
            )
        self.per_pair["margin"] = margins
        return margins

    # 2. Allocation.
    def allocate(self, margins: np.ndarray):
        m = self.cfg.mars
        q = allocation_weights(margins, m.tau, m.allocation if self.plan.by_margin else "uniform", m.margin_scale)
        b = integer_budgets(q, m.budget, self.rng)
        # Equal weights (all of them under uniform) are ordered at random under the seed wherever
        # pairs are picked in order of q: the reserve, the shortfall moves and the top-up rounds.
        tiebreak = self.rng.permutation(self.n)
        self.per_pair.update(q=q, budget=b)
        diagnostics = allocation_diagnostics(q, b, margins if self.plan.by_margin else None)
        if self.plan.by_margin:
            self.log(
                f"{_EPOCH_LABEL.get()} allocation of {m.budget} synthetic pairs: effective sample size "
                f"{diagnostics['ess_ratio']:.2f} x N (1 = uniform); the lowest-margin 10% of pairs hold "
                f"{diagnostics['q_share_lowest_decile']:.0%} of q"
            )
        return q, b, tiebreak, diagnostics

    # 3-4. Semantic labels and refinement of the low-distance pairs that may receive budget: those
    # with budget and the reserve; pairs a top-up round reaches are refined there. Every pair that
    # ends up with synthetic pairs has been through the semantic step.
    def semantic_step(self, q: np.ndarray, b: np.ndarray, tiebreak: np.ndarray):
        cfg, pairs = self.cfg, self.pairs
        chosen = np.array(pairs.column(S.CHOSEN).to_pylist(), dtype=object)
        rejected = np.array(pairs.column(S.REJECTED).to_pylist(), dtype=object)
        check = cfg.rewrite.label_check
        if check == "auto":
            check = "reward" if self.epoch > 1 or cfg.mars.warmup_passes > 0 else "none"
        ledger = _Ledger(Counter(), self.times, self.log)
        texts = _Texts(self.ids, chosen, rejected)
        sem = _Semantic(cfg, pairs, texts, self.per_pair, ledger, reward_ref=self.reward_ref, label_check=check)
        reserve = reserve_pairs(b, q, cfg.paraphrase.reserve, tiebreak)
        if self.plan.semantic and not cfg.semantic.active(cfg.rewrite.model):
            why = (
                "semantic.enabled false"
                if cfg.semantic.enabled is False
                else f"the built-in rewriter {cfg.rewrite.model} fails the rewrite quality figure (docs/results.md); "
                "set semantic.enabled true, or a capable rewrite.model"
            )
            self.summary["semantic"] = {"off": why}
            if self.epoch == 1:
                self.log(f"{_EPOCH_LABEL.get()} semantic step off: {why}")
        elif self.plan.semantic:
            self.summary["semantic"] = sem.label()
            self.summary["semantic"]["low_with_budget"] = int((sem.low & (b > 0)).sum())
            self.summary["semantic"]["low_in_reserve"] = int((sem.low & (reserve > 0)).sum())
            sem.refine((b > 0) | (reserve > 0), "first round")
        return sem, reserve

    # 5-6. Paraphrases of the (refined) responses, plus the reserve's rejected responses; pools that
    # fit the budget. When the quality gate left the pools too small, top-up rounds ask one more
    # paraphrase per side (further down each text's bank walk) for the pairs with the largest
    # allocation weight until the budget fits or the rounds run out.
    def fill_pools(self, sem: _Semantic, q: np.ndarray, b: np.ndarray, tiebreak: np.ndarray, reserve: np.ndarray):
        cfg, n = self.cfg, self.n
        n_plus, n_minus = split_counts(b)
        ask = _Texts(self.ids, sem.chosen, sem.rejected)
        kept_c, kept_r, para = _paraphrase(cfg, ask, n_plus, n_minus + reserve, self._ledger(sem))
        para["reserve_texts"] = int(reserve.sum())
        self.summary["paraphrase"] = para

        def fit():
            cap = np.array([pool_capacity(len(kept_c[i]), len(kept_r[i]), bool(sem.refined[i])) for i in range(n)])
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
            more_c, more_r, info = _paraphrase(
                cfg, _Texts(self.ids, sem.chosen, sem.rejected), want_c, want_r, self._ledger(sem), topup=rnd
            )
            for i in np.flatnonzero(extra):
                kept_c[i], kept_r[i] = more_c[i], more_r[i]
            info["extra_asked"] = int(2 * extra.sum())
            b_fit, unspent = fit()
            para["topup_rounds"].append({**info, "unspent_after": unspent})
        return kept_c, kept_r, para, b_fit, unspent

    def _ledger(self, sem: _Semantic) -> _Ledger:
        return sem.ledger

    # 6. Pools -> exactly B synthetic pairs, with lineage.
    def draw(self, sem: _Semantic, kept_c, kept_r, b_fit: np.ndarray, q: np.ndarray) -> list[dict[str, Any]]:
        cfg, pairs = self.cfg, self.pairs
        return draw_synthetic_pairs(
            SyntheticDraw(
                pair_ids=self.ids,
                prompts=pairs.column(S.PROMPT).to_pylist(),
                subsets=pairs.column(S.SUBSET).to_pylist(),
                chosen=sem.chosen,
                rejected=sem.rejected,
                kept_chosen=kept_c,
                kept_rejected=kept_r,
                budgets=b_fit,
                refined=sem.refined,
                q=q,
                margins=pairs.column(S.MARGIN).to_pylist() if S.MARGIN in pairs.column_names else None,
            ),
            seed=cfg.seed,
            epoch=self.epoch,
            generator=cfg.paraphrase.model,
            refined_generator=f"rewrite={cfg.rewrite.model};paraphrase={cfg.paraphrase.model}",
        )


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

    def __init__(
        self,
        cfg: Config,
        pairs: pa.Table,
        texts: _Texts,
        per_pair: dict,
        ledger: _Ledger,
        *,
        reward_ref: str,
        label_check: str,
    ):
        self.cfg, self.pairs, self.per_pair, self.ledger = cfg, pairs, per_pair, ledger
        self.ids, self.chosen, self.rejected = texts.ids, texts.chosen, texts.rejected
        self.times, self.log = ledger.times, ledger.log
        self.reward_ref, self.label_check = reward_ref, label_check
        n = len(self.ids)
        self.refined = np.zeros(n, dtype=bool)
        self.status = np.full(n, "", dtype=object)
        self.attempted = np.zeros(n, dtype=bool)
        self.low = np.zeros(n, dtype=bool)
        self.dist: np.ndarray | None = None
        self.gen_stats: Counter = ledger.gen_stats
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


@dataclass
class _Texts:
    """The pairs' current responses (rewrites replace them) by pair id."""

    ids: list[str]
    chosen: np.ndarray
    rejected: np.ndarray


@dataclass
class _Ledger:
    """Where a stage records its generation counts, its time and its console line."""

    gen_stats: Counter
    times: dict[str, float]
    log: Callable[[str], None]


def _paraphrase(cfg: Config, texts_of: _Texts, n_plus, n_minus, ledger: _Ledger, topup: int = 0):
    """Gated paraphrases: ``n_plus[i]`` of pair i's chosen response, ``n_minus[i]`` of its rejected."""
    from mars_ray.stages.common import map_with_actors
    from mars_ray.stages.generate import STAT_COLUMNS, ParaphraseActor, longest_first, paraphrase_actor_kwargs

    ids, chosen, rejected = texts_of.ids, texts_of.chosen, texts_of.rejected
    gen_stats, times, log = ledger.gen_stats, ledger.times, ledger.log
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
