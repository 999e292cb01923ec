"""The training strategies, one home each: what a strategy adds to the human pairs in one MARS
epoch (synthetic pairs, per-pair records, loss weights, a summary). The T-epoch loop
(:mod:`mars_ray.pipeline`) is the same for all of them.

=============  =====================================================================================
none           the human pairs alone
uniform        the budget of paraphrased pairs spread evenly (:mod:`mars_ray.augment`)
mars           the budget by softmax(-tau * margin) of r^{t-1}, with the semantic step (rewrites)
mars-nosem     the same allocation without the semantic step
west-of-n      one best-vs-worst pair per group of N sampled responses, ranked by r^{t-1}
adaboost       no new pairs: the human pairs reweighted, w ∝ exp(-beta * margin)
=============  =====================================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mars_ray import console
from mars_ray.augment import EpochResult
from mars_ray.config import Config
from mars_ray.core import atomic
from mars_ray.core import schema as S

__all__ = ["STRATEGIES", "EpochContext", "Strategy", "strategy_for"]

LOSS_WEIGHT = "loss_weight"  # per-pair loss weights (AdaBoost's; train.parquet of that epoch only)


@dataclass
class EpochContext:
    """What a strategy's epoch works from: the human pairs, the current training set (the human
    pairs plus earlier epochs' synthetic ones), r^{t-1} and, when its training run scored them,
    its margins of the human pairs; where the epoch writes; how it reports."""

    cfg: Config
    originals: pa.Table
    current: pa.Table
    prev_model: str
    epoch: int
    epoch_dir: Path
    log: Callable[[str], None]
    scores: pa.Table | None = None

    @property
    def label(self) -> str:
        return f"[epoch {self.epoch}/{self.cfg.mars.epochs}]"


def _empty_pairs() -> pa.Table:
    return S.PAIR_SCHEMA.empty_table()


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class Strategy:
    """One training strategy. ``margins_from_training``: the training run of r^t scores r^t's
    margins of the human pairs for the next epoch (the strategies whose allocation reads them)."""

    name: str = ""
    margins_from_training: bool = False

    def augment(self, ctx: EpochContext) -> EpochResult:
        raise NotImplementedError


class Paraphrase(Strategy):
    """none, uniform, mars, mars-nosem: :func:`mars_ray.augment.run_epoch` (its ``Plan`` says what
    each changes); writes the epoch's ``allocation.parquet`` and ``augment_summary.md``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.margins_from_training = name in ("mars", "mars-nosem")

    def augment(self, ctx: EpochContext) -> EpochResult:
        from mars_ray.augment import run_epoch, summary_markdown

        res = run_epoch(
            ctx.cfg,
            ctx.originals,
            reward_ref=ctx.prev_model,
            epoch=ctx.epoch,
            log=ctx.log,
            label=ctx.label,
            margins=ctx.scores,
        )
        _write_parquet(res.per_pair, ctx.epoch_dir / "allocation.parquet")
        atomic.write_text(ctx.epoch_dir / "augment_summary.md", summary_markdown(res.summary))
        return res


class WestOfN(Strategy):
    """West-of-N: for each distinct prompt, groups of N sampled responses ranked by r^{t-1}; the
    best and the worst of a group make one synthetic pair (``mars.west_of_n``, the budget in groups)."""

    name = "west-of-n"

    def augment(self, ctx: EpochContext) -> EpochResult:
        syn, summary = _west_of_n(ctx.cfg, ctx.originals, ctx.prev_model, ctx.epoch, ctx.log)
        return EpochResult(syn, pa.table({S.PAIR_ID: ctx.originals.column(S.PAIR_ID)}), summary)


class AdaBoost(Strategy):
    """AdaBoost-style reweighting: no new pairs; every pair of the current set weighted by
    exp(-beta * margin) under r^{t-1} (``mars.adaboost_beta``)."""

    name = "adaboost"

    def augment(self, ctx: EpochContext) -> EpochResult:
        from mars_ray.core.losses import adaboost_weights
        from mars_ray.stages.score import score_margins

        cfg, current = ctx.cfg, ctx.current
        t0 = time.perf_counter()
        with console.stage(f"{ctx.label} score margins", total=current.num_rows, unit="pairs") as st:
            scored = score_margins(current, model_ref=ctx.prev_model, cfg=cfg)
            margins = np.asarray(scored.column("margin").to_numpy(), dtype=np.float64)
            st.done(f"margin mean {margins.mean():+.3f}, std {margins.std():.3f}")
        w = adaboost_weights(margins, cfg.mars.adaboost_beta)
        per_pair = pa.table({S.PAIR_ID: current.column(S.PAIR_ID), "margin": margins, LOSS_WEIGHT: w})
        _write_parquet(per_pair, ctx.epoch_dir / "allocation.parquet")
        summary = {
            "epoch": ctx.epoch,
            "strategy": self.name,
            "pairs": current.num_rows,
            "synthetic": 0,
            "weights": {"min": float(w.min()), "max": float(w.max()), "beta": cfg.mars.adaboost_beta},
            "stage_seconds": {"score margins": round(time.perf_counter() - t0, 3)},
        }
        return EpochResult(_empty_pairs(), per_pair, summary, loss_weights=w)


STRATEGIES: dict[str, Strategy] = {
    **{name: Paraphrase(name) for name in ("none", "uniform", "mars", "mars-nosem")},
    "west-of-n": WestOfN(),
    "adaboost": AdaBoost(),
}


def strategy_for(name: str) -> Strategy:
    """The strategy called ``name``.

    Raises:
        ValueError: an unknown name (the known ones listed).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown mars.strategy {name!r}; one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


# --------------------------------------------------------------------------------------------
# West-of-N
# --------------------------------------------------------------------------------------------


def _west_of_n(cfg: Config, originals: pa.Table, prev_model: str, epoch: int, log):
    from collections import Counter

    from mars_ray.core.west_of_n import group_counts
    from mars_ray.runtime import init_ray
    from mars_ray.stages.west_of_n import west_of_n_groups

    t0 = time.perf_counter()
    prompts = originals.column(S.PROMPT).to_pylist()
    ids = originals.column(S.PAIR_ID).to_pylist()
    subsets = originals.column(S.SUBSET).to_pylist()
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    uniq = sorted(first.values())  # one source pair per distinct prompt (its first occurrence)
    rng = np.random.default_rng([cfg.seed, epoch, 17])
    groups = group_counts(len(uniq), cfg.mars.budget, rng)
    summary: dict[str, Any] = {
        "epoch": epoch,
        "strategy": "west-of-n",
        "pairs": originals.num_rows,
        "budget": cfg.mars.budget,
        "prompts": int((groups > 0).sum()),
        "n": cfg.mars.west_of_n,
    }
    if cfg.mars.budget == 0:
        summary.update(synthetic=0, budget_unspent=0)
        return _empty_pairs(), summary
    init_ray(cfg.resources)
    table = pa.table({"key": [str(i) for i in uniq], "prompt": [prompts[i] for i in uniq]})
    with console.stage(
        f"[epoch {epoch}/{cfg.mars.epochs}] west-of-n: {int(groups.sum())} groups of {cfg.mars.west_of_n} responses",
        total=int((groups > 0).sum()),
        unit="prompts",
    ):
        out = west_of_n_groups(table, cfg, reward_ref=prev_model, groups=groups, epoch=epoch)
    rows = []
    status = Counter(out.column("status").to_pylist())
    for r in sorted(out.to_pylist(), key=lambda r: tuple(int(x) for x in r["key"].split(":"))):
        if r["status"] != "ok":
            continue
        i = int(r["key"].split(":")[0])
        rows.append(
            {
                S.PAIR_ID: S.pair_id(prompts[i], r["chosen"], r["rejected"]),
                S.PROMPT: prompts[i],
                S.CHOSEN: r["chosen"],
                S.REJECTED: r["rejected"],
                S.SUBSET: subsets[i],
                S.SPLIT: "train",
                S.SOURCE_FILE: None,
                S.SOURCE_LINE: None,
                S.FLAGS: [],
                S.META: None,
                S.ORIGIN: S.ORIGIN_SYNTHETIC,
                S.SOURCE_PAIR_ID: ids[i],
                S.EPOCH: int(epoch),
                S.OPERATION: f"west-of-{cfg.mars.west_of_n}",
                S.GENERATOR: cfg.paraphrase.model,
                S.WEIGHT: float(r["best_score"] - r["worst_score"]),
            }
        )
    from mars_ray.generation import check_failure_rate

    syn = pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA)
    gen = {
        c.removeprefix("gen_"): int(np.sum(out.column(c).to_numpy()))
        for c in ("gen_requested", "gen_hits", "gen_generated", "gen_failed", "gen_corrupt")
        if c in out.column_names
    }
    check_failure_rate(
        "west-of-n",
        gen.get("generated", 0),
        gen.get("failed", 0),
        cfg.augment.max_failure_rate,
        f"{cfg.paraphrase.backend}:{cfg.paraphrase.model}",
    )
    summary.update(
        synthetic=syn.num_rows,
        budget_unspent=int(groups.sum()) - syn.num_rows,
        groups=dict(status),
        generation=gen,
        audit=_west_of_n_audit(cfg, gen, status, rows, originals, epoch),
        stage_seconds={"west-of-n": round(time.perf_counter() - t0, 3)},
    )
    return syn, summary


def _west_of_n_audit(cfg: Config, gen: dict[str, int], status, rows: list[dict], originals: pa.Table, epoch: int):
    """The audit of a West-of-N epoch: every sampled response is kept (the best or worst of its
    group), failed, or unused (a middle response, or one of a group that made no pair: ``groups``
    counts the groups by status)."""
    from mars_ray.core.audit import audit_examples

    generated = int(gen.get("requested", 0))
    kept, failed = 2 * len(rows), int(gen.get("failed", 0))
    op = {
        "generated": generated,
        "kept": kept,
        "unused": generated - kept - failed,
        "generation_failed": failed,
        "rejected": {},
        "groups": {str(k): int(v) for k, v in sorted(status.items())},
    }
    originals_rows = originals.select([S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED]).to_pylist()
    return {
        "operations": {"west-of-n": op},
        "examples": audit_examples(rows, originals_rows, np.random.default_rng([cfg.seed, epoch, 1])),
    }
