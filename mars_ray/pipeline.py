"""`mars-ray train`: the T-epoch MARS loop (Algorithm 1) and every baseline, as one driver.

Per epoch t = 1..T, with r⁰ the base model and D⁰ the original training pairs::

    synthetic data with r^{t-1}   (strategy: what differs, see the table)
    Dᵗ = D^{t-1} ∪ D_syn          (originals are never dropped; every synthetic row has lineage)
    rᵗ = train r^{t-1} on Dᵗ      (Ray Train, warm start, checkpoint per pass)
    validation + test metrics     (one row of metrics.jsonl / metrics.csv)

=============  =====================================================================
strategy       epoch t adds
=============  =====================================================================
none           nothing (the same number of training passes on the originals)
uniform        B paraphrase pairs, budget spread evenly
mars           B pairs, budget by softmax(-τΔ) + semantic refinement (v2; abs: v1)
mars-nosem     as mars without the semantic step
west-of-n      B (best, worst) pairs from groups of N responses scored by r^{t-1}
adaboost       no pairs; loss weights ∝ exp(-βΔ) of D^{t-1} under r^{t-1}
=============  =====================================================================

Every strategy sees the same data subset, splits, seed and budget. The run directory::

    config.yaml                   the resolved configuration
    data/                         pairs.parquet (all splits), train/val/test.parquet, quarantine, report
    epochs/NNN/                   synthetic.parquet, train.parquet (Dᵗ, lineage), allocation.parquet,
                                  augment_summary.json/.md, manifest.json (written last: epoch done)
    ray_train/epoch_NNN/          Ray Train's checkpoints (model, optimizer, RNG states); deleted
                                  when the run finishes unless output.keep_checkpoints
    metrics.jsonl, metrics.csv    one row per epoch (epoch, val_accuracy, val_snr, test_*, ...)
    model/                        the final reward model: a plain Hugging Face folder (LoRA merged)
    summary.json

``resume`` continues a killed run: finished epochs (those with a manifest) are read back, an epoch
cut off in training resumes from Ray Train's last checkpoint, and generation hits the cache, so the
run ends with the metrics an uninterrupted run with the same seed gets.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mars_ray import console
from mars_ray.config import CONFIG_FILENAME, Config
from mars_ray.core import atomic
from mars_ray.core import schema as S
from mars_ray.train.loop import SCORES_FILE

METRICS_JSONL, METRICS_CSV, SUMMARY_FILE, MANIFEST = "metrics.jsonl", "metrics.csv", "summary.json", "manifest.json"
LOSS_WEIGHT = "loss_weight"  # per-epoch AdaBoost weights (train.parquet of that epoch only)
MODEL_DIR = "model"
STRATEGIES = ("none", "uniform", "mars", "mars-nosem", "west-of-n", "adaboost")

# Columns of metrics.csv, in order (metrics.jsonl has these and more).
CSV_COLUMNS = (
    "epoch",
    "strategy",
    "train_pairs",
    "synthetic",
    "budget_unspent",
    "val_accuracy",
    "val_snr",
    "val_loss",
    "val_margin_mean",
    "val_margin_std",
    "test_accuracy",
    "test_snr",
    "train_loss",
    "train_tokens_per_s",
    "steps",
    "precision",
    "augment_s",
    "train_s",
    "eval_s",
)


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, or is not a run to resume)."""


# --------------------------------------------------------------------------------------------
# Run directory helpers
# --------------------------------------------------------------------------------------------


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "epochs" / f"{epoch:03d}"


def _write_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj)


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The configuration a run was started with (for ``--resume``).

    Raises:
        RunDirError: ``run_dir`` is not a `mars-ray train` run directory.
    """
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.exists() or not (Path(run_dir) / "data" / "pairs.parquet").exists():
        raise RunDirError(f"{run_dir}: not a mars-ray train run directory (no {CONFIG_FILENAME} + data/pairs.parquet)")
    return Config.load(path)


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
    if resume:
        return
    used = run_dir.exists() and any(run_dir.iterdir())
    if used and not cfg.output.overwrite:
        raise RunDirError(
            f"{run_dir} is not empty; resume it with `mars-ray train --resume {run_dir}`, choose another "
            "--output.dir, or pass --output.overwrite true to replace it"
        )
    if used:
        for name in (
            "epochs",
            "ray_train",
            "data",
            MODEL_DIR,
            METRICS_JSONL,
            METRICS_CSV,
            SUMMARY_FILE,
            CONFIG_FILENAME,
        ):
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _load_data(cfg: Config, run_dir: Path, resume: bool, log) -> dict[str, pa.Table]:
    """Splits of the run's data; read from the source once, then always from ``data/``."""
    from mars_ray.data.load import read_preferences, write_quarantine

    d = run_dir / "data"
    if not (resume and (d / "pairs.parquet").exists()):
        d.mkdir(parents=True, exist_ok=True)
        res = read_preferences(cfg.data, seed=cfg.seed)
        write_quarantine(res.quarantine, d / "quarantine.jsonl")
        _write_json(d / "data_report.json", res.report)
        r = res.report
        log(
            f"[data] read {r['read']} = kept {r['kept']} + quarantined {r['quarantined']}; selected {r['selected']} "
            f"(train {r['splits']['train']}, val {r['splits']['val']}, test {r['splits']['test']})"
        )
        for split in ("train", "val", "test"):
            _write_parquet(res.table.filter(pc.equal(res.table.column(S.SPLIT), split)), d / f"{split}.parquet")
        _write_parquet(res.table, d / "pairs.parquet")
    out = {s: pq.read_table(d / f"{s}.parquet") for s in ("train", "val", "test")}
    if out["train"].num_rows == 0:
        raise ValueError(f"{cfg.data.path}: no training pairs after splitting (lower data.val_fraction/test_fraction?)")
    if out["val"].num_rows == 0:
        log("[data] warning: no validation pairs (data.val_fraction=0): val_* metrics will be NaN")
    return out


# --------------------------------------------------------------------------------------------
# What each strategy adds in one epoch
# --------------------------------------------------------------------------------------------


def _empty_pairs() -> pa.Table:
    return S.PAIR_SCHEMA.empty_table()


def _augment(
    cfg: Config,
    originals: pa.Table,
    current: pa.Table,
    prev_model: str,
    epoch: int,
    ep: Path,
    log,
    scores: pa.Table | None = None,
):
    """Returns (synthetic table, per-epoch summary, AdaBoost weights for ``current`` or None).
    ``scores``: ``prev_model``'s margins of ``originals`` when its training run scored them."""
    strategy = cfg.mars.strategy
    if strategy in ("mars", "mars-nosem", "uniform", "none"):
        from mars_ray.augment import run_epoch, summary_markdown

        res = run_epoch(
            cfg,
            originals,
            reward_ref=prev_model,
            epoch=epoch,
            log=log,
            label=f"[epoch {epoch}/{cfg.mars.epochs}]",
            margins=scores,
        )
        _write_parquet(res.per_pair, ep / "allocation.parquet")
        atomic.write_text(ep / "augment_summary.md", summary_markdown(res.summary))
        return res.synthetic, res.summary, None
    if strategy == "west-of-n":
        return (*_west_of_n(cfg, originals, prev_model, epoch, log), None)
    if strategy == "adaboost":
        from mars_ray.core.losses import adaboost_weights
        from mars_ray.stages.score import score_margins

        t0 = time.perf_counter()
        with console.stage(
            f"[epoch {epoch}/{cfg.mars.epochs}] score margins", total=current.num_rows, unit="pairs"
        ) as st:
            scored = score_margins(current, model_ref=prev_model, cfg=cfg)
            margins = np.asarray(scored.column("margin").to_numpy(), dtype=np.float64)
            st.done(f"margin mean {margins.mean():+.3f}, std {margins.std():.3f}")
        w = adaboost_weights(margins, cfg.mars.adaboost_beta)
        _write_parquet(
            pa.table({S.PAIR_ID: current.column(S.PAIR_ID), "margin": margins, LOSS_WEIGHT: w}),
            ep / "allocation.parquet",
        )
        summary = {
            "epoch": epoch,
            "strategy": strategy,
            "pairs": current.num_rows,
            "synthetic": 0,
            "weights": {"min": float(w.min()), "max": float(w.max()), "beta": cfg.mars.adaboost_beta},
            "stage_seconds": {"score margins": round(time.perf_counter() - t0, 3)},
        }
        return _empty_pairs(), summary, w
    raise ValueError(f"unknown mars.strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


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


# --------------------------------------------------------------------------------------------
# r^0 with warm-up passes
# --------------------------------------------------------------------------------------------

WARMUP_FILE = "warmup.json"
BASE_FILE = "base_metrics.json"  # data/: the test metrics of model.reward before training


def epoch_config(cfg: Config, epoch: int) -> Config:
    """``cfg`` for MARS epoch ``epoch``'s training run: ``train.passes_per_epoch[epoch - 1]`` passes
    when that list is set, else ``cfg`` itself."""
    per = cfg.train.passes_per_epoch
    return cfg.copy({"train.passes": int(per[epoch - 1])}, source=f"epoch {epoch}") if per else cfg


def loss_weights(grown: pa.Table, weights: np.ndarray | None, synthetic_weight: float) -> np.ndarray | None:
    """Per-pair loss weights of the grown training set: ``weights`` (AdaBoost's, or none) times
    ``synthetic_weight`` on the synthetic pairs; None when every weight would be 1. The training
    loop scales them to mean 1."""
    if synthetic_weight == 1.0:
        return weights
    base = np.ones(grown.num_rows) if weights is None else np.asarray(weights, dtype=np.float64)
    synthetic = pc.equal(grown.column(S.ORIGIN), S.ORIGIN_SYNTHETIC).to_numpy(zero_copy_only=False)
    return np.where(synthetic, base * float(synthetic_weight), base)


def warmup_key(cfg: Config, train_ids: list[str]) -> str:
    """What r^0 after warm-up depends on: the backbone, the training pairs, the training and
    DeepSpeed settings, the length limits, the seed and the passes; not the strategy, budget or tau,
    so every strategy of a seed shares one r^0."""
    import hashlib

    ref = cfg.model.reward
    if Path(os.path.expanduser(ref)).exists():
        ref = str(Path(os.path.expanduser(ref)).resolve())
    # what the warm-up's training does not depend on (it trains on human pairs only, warmup_passes)
    ignore = ("max_failures", "num_workers", "threads", "synthetic_weight", "passes_per_epoch")
    train = {k: v for k, v in cfg.to_dict()["train"].items() if k not in ignore}
    blob = json.dumps(
        {
            "reward": ref,
            "dtype": cfg.model.dtype,
            "train": train,
            "deepspeed": cfg.to_dict()["deepspeed"],
            "limits": [cfg.data.max_prompt_tokens, cfg.data.max_response_tokens],
            "seed": cfg.seed,
            "passes": cfg.mars.warmup_passes,
            "pairs": sorted(train_ids),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warmup_model(
    cfg: Config,
    run_dir: Path,
    train_path: Path,
    val_path: Path | None,
    log,
    test_path: Path | None = None,
    score: bool = False,
) -> dict[str, Any]:
    """r^0 = ``model.reward`` trained ``mars.warmup_passes`` passes on the human training pairs,
    built once per :func:`warmup_key` under ``model.cache_dir/warmup/`` (a file lock keeps two trials
    from building the same one) and recorded in the run directory's ``warmup.json``.

    ``test_path``: the build also scores these pairs with ``model.reward`` before its first step
    (``info["base"]``, the test metrics of the untrained model; kept with the shared r^0).
    ``score``: r^0's margins of the training pairs are kept with it too (``info["scores_path"]``)."""
    import fcntl

    from mars_ray.models.resolve import cache_root
    from mars_ray.train.loop import FitSpec, fit_reward_model

    ids = pq.read_table(train_path, columns=[S.PAIR_ID]).column(S.PAIR_ID).to_pylist()
    key = warmup_key(cfg, ids)
    root = cache_root(cfg.model.cache_dir) / "warmup"
    root.mkdir(parents=True, exist_ok=True)
    done = root / key
    t0 = time.perf_counter()
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = not (done / WARMUP_FILE).exists()
        if built:
            wcfg = cfg.copy({"train.passes": cfg.mars.warmup_passes}, source="warm-up")
            with console.stage(
                f"[warm-up] r0: train {cfg.model.reward} {cfg.mars.warmup_passes} pass(es) on {len(ids)} human pairs"
            ) as st:
                fit = fit_reward_model(
                    wcfg,
                    FitSpec(
                        init_model=cfg.model.reward,
                        train_path=train_path,
                        val_path=val_path,
                        run_dir=run_dir / "ray_train",
                        name="warmup",
                        epoch=0,
                        max_failures=cfg.train.max_failures,
                        test_path=test_path,
                        test_before=test_path is not None,
                        score_path=train_path if score else None,
                    ),
                )
                st.done(_fit_result(fit))
            tmp = root / f"{key}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(fit["model_dir"], tmp / MODEL_DIR)
            if fit.get("scores_path"):
                shutil.copy2(fit["scores_path"], tmp / SCORES_FILE)
            info = {
                "key": key,
                "passes": cfg.mars.warmup_passes,
                "base_model": cfg.model.reward,
                "train_pairs": len(ids),
                "seed": cfg.seed,
                "seconds": round(time.perf_counter() - t0, 1),
                **{k: _finite(v) for k, v in fit.items() if k.startswith("val_") or k == "train_loss"},
                "base": _base_from_fit(fit),
            }
            _write_json(tmp / WARMUP_FILE, info)
            os.replace(tmp, done)  # complete or absent: a reader never sees half a model
        info = json.loads((done / WARMUP_FILE).read_text(encoding="utf-8"))
    info = {**info, "model_dir": str(done / MODEL_DIR), "built_by_this_run": built}
    if (done / SCORES_FILE).exists():
        info["scores_path"] = str(done / SCORES_FILE)
    _write_json(run_dir / WARMUP_FILE, info)
    if not built:
        log(f"[warm-up] r0 shared from an earlier run ({done}): val accuracy {_fmt(info.get('val_accuracy'))}")
    return info


def _fit_result(fit: dict[str, Any]) -> str:
    """A training stage's result for its console line."""
    parts = [f"train loss {_fmt(fit.get('train_loss'))}"]
    if fit.get("val_accuracy") is not None:
        parts.append(f"val accuracy {_fmt(fit.get('val_accuracy'))}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _test_metrics(cfg: Config, test: pa.Table, model_dir: str) -> dict[str, Any]:
    from mars_ray.core.losses import pair_metrics
    from mars_ray.stages.score import score_margins

    if test.num_rows == 0:
        return {}
    scored = score_margins(test, model_ref=model_dir, cfg=cfg)
    m = pair_metrics(scored.column("reward_chosen").to_numpy(), scored.column("reward_rejected").to_numpy())
    return {f"test_{k}": v for k, v in m.items()}


def _finite(x: Any) -> Any:
    """NaN/inf as None in JSON (strict JSON readers choke on NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.jsonl (every key) and metrics.csv (CSV_COLUMNS), rewritten from the epoch rows."""
    atomic.write_jsonl(run_dir / METRICS_JSONL, ({k: _finite(v) for k, v in r.items()} for r in rows))
    with atomic.atomic_path(run_dir / METRICS_CSV) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return atomic.read_jsonl(Path(run_dir) / METRICS_JSONL)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def run_mars(
    cfg: Config,
    *,
    resume: bool = False,
    log: Callable[[str], None] = console.say,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    base_metrics: bool = False,
) -> dict[str, Any]:
    """Run (or resume) ``cfg.mars.epochs`` epochs of ``cfg.mars.strategy`` into ``cfg.output.dir``.

    ``on_epoch`` is called with each epoch's metrics row once that epoch is finished (also for
    epochs a resumed run finds done), e.g. to report to Ray Tune.

    ``base_metrics``: also score the test split with ``model.reward`` as it is (the "before" of
    the run's end summary, ``summary["base"]``), inside the first training run before its first
    step; a scoring pool only when no training run of this call could (resumed epochs, a shared r0).

    Returns the summary (also ``summary.json``).

    Raises:
        RunDirError: the output directory is in use (and neither resume nor overwrite was asked).
        ValueError / DataFileError: configuration or data problems, before anything is trained.
    """
    from mars_ray.runtime import init_ray
    from mars_ray.train.loop import FitSpec, fit_reward_model

    cfg.validate()
    if cfg.mars.strategy not in STRATEGIES:
        raise ValueError(f"unknown mars.strategy {cfg.mars.strategy!r}; one of {', '.join(STRATEGIES)}")
    run_dir = Path(cfg.output.dir).resolve()
    _prepare_run_dir(cfg, run_dir, resume)
    cfg.save(run_dir)
    t_run = time.perf_counter()
    splits = _load_data(cfg, run_dir, resume, log)
    originals = splits["train"]
    val_path = run_dir / "data" / "val.parquet" if splits["val"].num_rows else None
    init_ray(cfg.resources)
    _say_new_head(cfg, log)
    test_path = run_dir / "data" / "test.parquet" if splits["test"].num_rows else None
    base_path = run_dir / "data" / BASE_FILE
    base = json.loads(base_path.read_text(encoding="utf-8")) if base_metrics and base_path.exists() else None
    # The "before": scored by the first training run of this run, before its first step.
    want_base = base_metrics and base is None and test_path is not None

    prev_model, current = cfg.model.reward, originals
    # The next epoch's margins of the original pairs, scored by the training run of r^t.
    score_in_training = cfg.mars.margins_in_training and cfg.mars.strategy in ("mars", "mars-nosem")
    prev_scores: str | None = None
    warm = None
    if cfg.mars.warmup_passes > 0:
        warm = warmup_model(
            cfg,
            run_dir,
            run_dir / "data" / "train.parquet",
            val_path,
            log,
            test_path=test_path if want_base else None,
            score=score_in_training,
        )
        prev_model = warm["model_dir"]
        prev_scores = warm.get("scores_path")
        if want_base:
            base = warm.get("base")
    rows: list[dict[str, Any]] = []
    T = cfg.mars.epochs
    for t in range(1, T + 1):
        ep = epoch_dir(run_dir, t)
        man_path = ep / MANIFEST
        if man_path.exists():
            man = json.loads(man_path.read_text(encoding="utf-8"))
            rows.append(man["metrics"])
            prev_model = man["model_dir"]
            if not Path(prev_model).exists() and (run_dir / MODEL_DIR / "config.json").exists():
                prev_model = str(run_dir / MODEL_DIR)  # a finished run's checkpoints were deleted: its final model
            prev_scores = man.get("scores_path")
            current = S.conform(pq.read_table(ep / "train.parquet"))
            log(f"[epoch {t}/{T}] done earlier: val_accuracy {_fmt(man['metrics'].get('val_accuracy'))} (resumed)")
            if on_epoch is not None:
                on_epoch(man["metrics"])
            continue
        ep.mkdir(parents=True, exist_ok=True)
        scorer = f"r{t - 1}" if t > 1 else ("r0 (warm-up)" if warm else "the base model")
        log(f"[epoch {t}/{T}] {cfg.mars.strategy}: augment {originals.num_rows} pairs, margins from {scorer}")
        t0 = time.perf_counter()
        scores = pq.read_table(prev_scores) if prev_scores and Path(prev_scores).exists() else None
        syn, aug_summary, weights = _augment(cfg, originals, current, prev_model, t, ep, log, scores)
        augment_s = time.perf_counter() - t0
        _write_parquet(syn, ep / "synthetic.parquet")
        _write_json(ep / "augment_summary.json", aug_summary)
        grown = pa.concat_tables([current, syn.cast(S.PAIR_SCHEMA)]) if syn.num_rows else current
        weights = loss_weights(grown, weights, cfg.train.synthetic_weight)
        to_train = grown.append_column(LOSS_WEIGHT, pa.array(weights, pa.float64())) if weights is not None else grown
        _write_parquet(to_train, ep / "train.parquet")

        t0 = time.perf_counter()
        with console.stage(f"[epoch {t}/{T}] train on {grown.num_rows} pairs ({syn.num_rows} new)") as st:
            fit = fit_reward_model(
                epoch_config(cfg, t),
                FitSpec(
                    init_model=prev_model,
                    train_path=ep / "train.parquet",
                    val_path=val_path,
                    run_dir=run_dir / "ray_train",
                    name=f"epoch_{t:03d}",
                    weights_column=LOSS_WEIGHT if weights is not None else None,
                    epoch=t,
                    max_failures=cfg.train.max_failures,
                    test_path=test_path,
                    test_before=want_base and base is None and t == 1 and warm is None,
                    # the last epoch's scores are the final model's reward statistics (config.json mean/std)
                    score_path=run_dir / "data" / "train.parquet" if (score_in_training and t < T) or t == T else None,
                ),
            )
            st.done(_fit_result(fit) + f", test accuracy {_fmt(fit.get('test_accuracy'))}")
        if want_base and base is None:
            base = _base_from_fit(fit)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        test = {k: v for k, v in fit.items() if k.startswith("test_")}
        if test_path is not None and "test_accuracy" not in test:  # e.g. a restart that reported its last checkpoint
            test = _test_metrics(cfg, splits["test"], fit["model_dir"])
        eval_s = time.perf_counter() - t0
        row = {
            "epoch": t,
            "strategy": cfg.mars.strategy,
            "train_pairs": grown.num_rows,
            "original_pairs": originals.num_rows,
            "synthetic": syn.num_rows,
            "synthetic_total": grown.num_rows - originals.num_rows,
            "budget": cfg.mars.budget,
            "budget_unspent": int(aug_summary.get("budget_unspent", 0) or 0),
            "synthetic_share": (grown.num_rows - originals.num_rows) / max(grown.num_rows, 1),
            "synthetic_weight": cfg.train.synthetic_weight,
            "passes": epoch_config(cfg, t).train.passes,
            **{k: v for k, v in fit.items() if k.startswith("val_")},
            **test,
            "train_loss": fit.get("train_loss"),
            "train_loss_first": fit.get("train_loss_first"),
            "train_loss_last": fit.get("train_loss_last"),
            "train_tokens_per_s": fit.get("train_tokens_per_s"),
            "step_time_s": fit.get("step_time_s"),
            "steps": fit.get("steps"),
            "precision": fit.get("precision"),
            "precision_reason": fit.get("precision_reason"),
            "world_size": fit.get("world_size"),
            "augment_s": round(augment_s, 2),
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
        }
        if fit.get("resumed_from_step") is not None:  # this training run continued a checkpoint inside it
            row["resumed_from_step"] = fit["resumed_from_step"]
        rows.append(row)
        if want_base and base is not None:  # kept for a resumed run
            _write_json(base_path, base)
            want_base = False
        manifest = {
            "epoch": t,
            "model_dir": fit["model_dir"],
            "checkpoint_dir": fit["checkpoint_dir"],
            "scores_path": fit.get("scores_path"),
            "init_model": prev_model,
            "train_file": str(ep / "train.parquet"),
            "train_pairs": grown.num_rows,
            "synthetic_file": str(ep / "synthetic.parquet"),
            "config_hash": cfg.hash(),
            "metrics": row,
        }
        write_metrics(run_dir, rows)
        _write_json(man_path, manifest)  # last: the epoch is done
        log(
            f"[epoch {t}/{T}] done: val accuracy {_fmt(row.get('val_accuracy'))}, val SNR {_fmt(row.get('val_snr'))}, "
            f"test accuracy {_fmt(row.get('test_accuracy'))} (augment {augment_s:.0f}s, train {train_s:.0f}s)"
        )
        prev_model, current, prev_scores = fit["model_dir"], grown, fit.get("scores_path")
        if on_epoch is not None:
            on_epoch(row)

    write_metrics(run_dir, rows)
    if want_base:  # not scored by a training run (resumed epochs, a shared r0): score it now
        base = base or _base_metrics(cfg, splits["test"])
        _write_json(base_path, base)
    final = run_dir / MODEL_DIR
    tmp = run_dir / (MODEL_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(prev_model, tmp)
    describe_model(
        cfg, run_dir, tmp, originals=originals, current=current, rows=rows, base=base, scores_path=prev_scores
    )
    atomic.replace_dir(tmp, final)  # model/ is complete at every moment (the old one until the swap)
    checkpoints = "kept"
    if not cfg.output.keep_checkpoints:
        freed, left = drop_checkpoints(run_dir / "ray_train")
        checkpoints = f"deleted ({freed / 2**20:.0f} MiB)"
        if left:
            checkpoints += f"; could not delete {len(left)}: " + "; ".join(left)
            log(f"warning: {checkpoints}")
    summary = {
        "run_dir": str(run_dir),
        "strategy": cfg.mars.strategy,
        "epochs": T,
        "model": str(final),
        "final": rows[-1] if rows else {},
        "seconds": round(time.perf_counter() - t_run, 1),
        "config_hash": cfg.hash(),
        "warmup": warm,
        "base": base,
        "checkpoints": checkpoints,
    }
    _write_json(
        run_dir / SUMMARY_FILE,
        {
            k: (_finite(v) if not isinstance(v, dict) else {a: _finite(b) for a, b in v.items()})
            for k, v in summary.items()
        },
    )
    try:
        from mars_ray.report import run_report

        run_report(run_dir)
    except Exception as e:  # a report must never cost a finished run
        log(f"report not written: {type(e).__name__}: {e}")
    return summary


def drop_checkpoints(root: Path) -> tuple[int, list[str]]:
    """Delete the checkpoint folders of every training run under ``root`` (``ray_train/``) once the
    run's final model is in ``model/``; Ray Train's logs and metrics stay. Returns the bytes freed
    and, for each folder that could not be deleted, its path and the error (reported, not raised:
    the run's model is already complete)."""
    freed, left = 0, []
    for d in sorted(root.glob("*/checkpoint_*")) if root.exists() else []:
        if d.is_dir():
            try:
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                shutil.rmtree(d)
            except OSError as e:
                left.append(f"{d}: {e}")
            else:
                freed += size
    return freed, left


def describe_model(
    cfg: Config,
    run_dir: Path,
    model_dir: Path,
    *,
    originals: pa.Table,
    current: pa.Table,
    rows: list[dict[str, Any]],
    base: dict[str, Any] | None,
    scores_path: str | None,
) -> None:
    """Make the saved model self-describing: the reward mean/std of the human training pairs in
    ``config.json`` (scored by the last training run, else here) and a model card."""
    from transformers import AutoTokenizer

    from mars_ray import model_card as MC
    from mars_ray.models.reward import uses_chat_template

    scores = pq.read_table(scores_path) if scores_path and Path(scores_path).exists() else None
    if scores is None or scores.num_rows != originals.num_rows:
        from mars_ray.stages.score import score_margins

        scores = score_margins(originals, model_ref=str(model_dir), cfg=cfg)
        source = "scored after training"
    else:
        source = "scored by the last training run"
    stats = MC.reward_statistics(scores.column("reward_chosen").to_numpy(), scores.column("reward_rejected").to_numpy())
    MC.store_reward_statistics(model_dir, stats, f"human training pairs, {source}")
    report_path = run_dir / "data" / "data_report.json"
    data_report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
    synthetic = current.filter(pc.equal(current.column(S.ORIGIN), S.ORIGIN_SYNTHETIC))
    operations: dict[str, int] = {}
    for op in synthetic.column(S.OPERATION).to_pylist():
        operations[op] = operations.get(op, 0) + 1
    text = MC.render_card(
        base_model=cfg.model.reward,
        strategy=cfg.mars.strategy,
        epochs=cfg.mars.epochs,
        budget=cfg.mars.budget,
        data_files=data_report.get("files") or [cfg.data.path],
        data_report=data_report,
        operations=operations,
        human_pairs=current.num_rows - synthetic.num_rows,
        final=rows[-1] if rows else {},
        base=base,
        stats=stats,
        config_hash=cfg.hash(),
        chat_template=uses_chat_template(AutoTokenizer.from_pretrained(str(model_dir))),
        decoder=_is_decoder(model_dir),
    )
    MC.write_card(model_dir, text, (run_dir / "config.yaml").read_text(encoding="utf-8"))


def _is_decoder(model_dir: Path) -> bool:
    """Whether the saved reward model is a decoder: transformers names a decoder's head ``score``
    (read at the last token), an encoder's ``classifier``."""
    from mars_ray.models.resolve import weight_keys

    return "score.weight" in (weight_keys(Path(model_dir)) or set())


def _say_new_head(cfg: Config, log: Callable[[str], None]) -> None:
    """transformers' "newly initialized" notice, once per run and in our words."""
    from mars_ray.models.resolve import has_reward_head

    try:
        head = has_reward_head(cfg.model.reward, cache_dir=cfg.model.cache_dir, offline=cfg.model.offline)
    except Exception:  # resolution problems are reported where the model is loaded
        return
    for line in _new_head_notes(cfg, head):
        log(line)


def _new_head_notes(cfg: Config, head: bool) -> list[str]:
    """What a run starting from a backbone without a reward head should tell its user: the head's
    scores are noise, and with no warm-up pass epoch 1 makes its choices from that noise."""
    if head:
        return []
    notes = [
        f"[model] {cfg.model.reward} has no reward head: a new linear head (seed {cfg.seed}) is added, "
        "so its scores are noise until training fits it"
    ]
    strategy = cfg.mars.strategy
    if cfg.mars.warmup_passes == 0 and strategy not in ("uniform", "none"):
        scaled = (
            " (margin_scale std stretches that noise to unit spread, so the allocation diagnostics look informative)"
            if cfg.mars.margin_scale == "std" and strategy in ("mars", "mars-nosem")
            else ""
        )
        notes.append(
            f"[mars] warning: mars.warmup_passes 0: strategy {strategy} makes epoch 1's choices from the new "
            f"head's scores{scaled}; mars.warmup_passes 1 trains the backbone on the human pairs first"
        )
    return notes


def _base_from_fit(fit: dict[str, Any]) -> dict[str, Any] | None:
    """``base_test_*`` metrics of a training run as ``test_*`` (None when it did not score them)."""
    base = {"test_" + k.removeprefix("base_test_"): _finite(v) for k, v in fit.items() if k.startswith("base_test_")}
    return base or None


def _base_metrics(cfg: Config, test: pa.Table) -> dict[str, Any]:
    """Test metrics of ``model.reward`` before any training, with a scoring pool."""
    with console.stage(f"[base] test {cfg.model.reward} before training", total=test.num_rows, unit="pairs") as st:
        base = _test_metrics(cfg, test, cfg.model.reward)
        st.done(f"accuracy {_fmt(base.get('test_accuracy'))}, SNR {_fmt(base.get('test_snr'))}")
    return base


def end_summary(summary: dict[str, Any]) -> list[str]:
    """At most 10 lines for the end of `mars-ray train`: what improved, the allocation, where the
    model, report and plots are, and the command that serves the model."""
    run_dir = Path(summary["run_dir"])
    final = summary.get("final") or {}
    base = summary.get("base") or {}
    warm = summary.get("warmup") or {}
    n_syn = final.get("synthetic_total", 0)
    lines = [
        f"done in {_duration(summary.get('seconds'))}: {summary['strategy']}, {summary['epochs']} epoch(s), "
        f"{final.get('original_pairs', '?')} human + {n_syn} synthetic training pairs"
        + (
            f" (synthetic loss weight {final['synthetic_weight']:g})"
            if final.get("synthetic_weight", 1.0) != 1.0
            else ""
        )
    ]

    def before_after(metric: str) -> str:
        b, a = base.get(f"test_{metric}"), final.get(f"test_{metric}")
        return f"{_fmt(b)} -> {_fmt(a)}" if b is not None else f"{_fmt(a)}"

    if final.get("test_accuracy") is not None:
        held = final.get("test_n") or ""
        lines.append(
            f"  test accuracy  {before_after('accuracy')}   (base model -> final"
            + (f", {held} held-out pairs)" if held else ")")
        )
        lines.append(f"  test SNR       {before_after('snr')}")
    loss = final.get("train_loss")
    if loss is not None:
        lines.append(f"  train loss     {_fmt(loss)} in the last epoch (ln 2 = 0.693: no better than a coin)")
    diag = _last_allocation(run_dir, summary.get("epochs", 0))
    if diag:
        lines.append(
            f"  allocation     effective sample size {diag['ess_ratio']:.2f} x N (1 = uniform); the lowest-margin "
            f"10% of pairs held {diag['q_share_lowest_decile']:.0%} of the budget weight (epoch {diag['epoch']})"
        )
    if final.get("precision"):
        lines.append(
            f"  precision      {final['precision']} ({final.get('precision_reason') or 'reason not recorded'})"
        )
    if warm:
        lines[0] += f"; r0 warmed up {warm.get('passes')} pass(es)"
    lines += [
        f"  model          {summary['model']}",
        f"  report         {run_dir / 'report.html'} (plots: {run_dir}/*.png)",
        f"  serve it       mars-ray serve --model {run_dir}",
    ]
    return lines


def _last_allocation(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    for t in range(int(epochs), 0, -1):
        path = epoch_dir(run_dir, t) / "augment_summary.json"
        if path.exists():
            d = json.loads(path.read_text(encoding="utf-8")).get("diagnostics") or {}
            if d.get("ess_ratio") is not None and d.get("q_share_lowest_decile") is not None:
                return {**d, "epoch": t}
    return None


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"
