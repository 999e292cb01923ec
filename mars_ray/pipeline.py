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
from dataclasses import dataclass
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
from mars_ray.strategies import LOSS_WEIGHT, EpochContext, Strategy, strategy_for
from mars_ray.strategies import STRATEGIES as STRATEGY_TABLE
from mars_ray.train.loop import SCORES_FILE, FitResult

METRICS_JSONL, METRICS_CSV, SUMMARY_FILE, MANIFEST = "metrics.jsonl", "metrics.csv", "summary.json", "manifest.json"
MODEL_DIR = "model"
STRATEGIES = tuple(STRATEGY_TABLE)

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
    atomic.prepare_output_dir(
        run_dir,
        overwrite=cfg.output.overwrite,
        owned=("epochs", "ray_train", "data", MODEL_DIR, METRICS_JSONL, METRICS_CSV, SUMMARY_FILE, CONFIG_FILENAME),
        in_use=lambda d: RunDirError(
            f"{d} is not empty; resume it with `mars-ray train --resume {d}`, choose another "
            "--output.dir, or pass --output.overwrite true to replace it"
        ),
    )


def _load_data(cfg: Config, run_dir: Path, resume: bool, log) -> dict[str, pa.Table]:
    """Splits of the run's data; read from the source once, then always from ``data/``."""
    from mars_ray.data.load import read_preferences, write_quarantine

    d = run_dir / "data"
    if not (resume and (d / "pairs.parquet").exists()):
        d.mkdir(parents=True, exist_ok=True)
        res = read_preferences(cfg.data, seed=cfg.seed)
        write_quarantine(res.quarantine, d / "quarantine.jsonl")
        atomic.write_json(d / "data_report.json", res.report)
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
            atomic.write_json(tmp / WARMUP_FILE, info)
            os.replace(tmp, done)  # complete or absent: a reader never sees half a model
        info = json.loads((done / WARMUP_FILE).read_text(encoding="utf-8"))
    info = {**info, "model_dir": str(done / MODEL_DIR), "built_by_this_run": built}
    if (done / SCORES_FILE).exists():
        info["scores_path"] = str(done / SCORES_FILE)
    atomic.write_json(run_dir / WARMUP_FILE, info)
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
    cfg.validate()
    strategy = strategy_for(cfg.mars.strategy)
    run = _Run.start(cfg, resume=resume, log=log, base_metrics=base_metrics, strategy=strategy)
    for t in range(1, cfg.mars.epochs + 1):
        row = run.resumed_epoch(t) or run.epoch(t)
        if on_epoch is not None:
            on_epoch(row)
    return run.finish()


class _Run:
    """A `mars-ray train` run in progress: its directory and data, r^{t-1} and its scores of the
    human pairs, the training set so far, the epochs' metrics rows, the "before" metrics."""

    def __init__(self, cfg: Config, run_dir: Path, strategy: Strategy, log: Callable[[str], None]) -> None:
        self.cfg, self.run_dir, self.strategy, self.log = cfg, run_dir, strategy, log
        self.t_run = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.prev_scores: str | None = None
        self.warm: dict[str, Any] | None = None

    @classmethod
    def start(cls, cfg: Config, *, resume: bool, log, base_metrics: bool, strategy: Strategy) -> _Run:
        """Prepare the run directory and data, start Ray, build or reuse r^0."""
        from mars_ray.runtime import init_ray

        run_dir = Path(cfg.output.dir).resolve()
        _prepare_run_dir(cfg, run_dir, resume)
        cfg.save(run_dir)
        run = cls(cfg, run_dir, strategy, log)
        run.splits = _load_data(cfg, run_dir, resume, log)
        run.originals = run.current = run.splits["train"]
        run.val_path = run_dir / "data" / "val.parquet" if run.splits["val"].num_rows else None
        init_ray(cfg.resources)
        _say_new_head(cfg, log)
        run.test_path = run_dir / "data" / "test.parquet" if run.splits["test"].num_rows else None
        run.base_path = run_dir / "data" / BASE_FILE
        has_base = base_metrics and run.base_path.exists()
        run.base = json.loads(run.base_path.read_text(encoding="utf-8")) if has_base else None
        # The "before": scored by the first training run of this run, before its first step.
        run.want_base = base_metrics and run.base is None and run.test_path is not None
        run.prev_model = cfg.model.reward
        # The next epoch's margins of the original pairs, scored by the training run of r^t.
        run.score_in_training = cfg.mars.margins_in_training and strategy.margins_from_training
        if cfg.mars.warmup_passes > 0:
            run.warm_up()
        return run

    def warm_up(self) -> None:
        train = self.run_dir / "data" / "train.parquet"
        self.warm = warmup_model(
            self.cfg,
            self.run_dir,
            train,
            self.val_path,
            self.log,
            test_path=self.test_path if self.want_base else None,
            score=self.score_in_training,
        )
        self.prev_model = self.warm["model_dir"]
        self.prev_scores = self.warm.get("scores_path")
        if self.want_base:
            self.base = self.warm.get("base")

    def resumed_epoch(self, t: int) -> dict[str, Any] | None:
        """Epoch ``t``'s metrics when an earlier run finished it (its manifest exists), else None."""
        ep = epoch_dir(self.run_dir, t)
        if not (ep / MANIFEST).exists():
            return None
        man = json.loads((ep / MANIFEST).read_text(encoding="utf-8"))
        self.rows.append(man["metrics"])
        self.prev_model = man["model_dir"]
        if not Path(self.prev_model).exists() and (self.run_dir / MODEL_DIR / "config.json").exists():
            self.prev_model = str(
                self.run_dir / MODEL_DIR
            )  # a finished run's checkpoints were deleted: its final model
        self.prev_scores = man.get("scores_path")
        self.current = S.conform(pq.read_table(ep / "train.parquet"))
        T = self.cfg.mars.epochs
        self.log(f"[epoch {t}/{T}] done earlier: val_accuracy {_fmt(man['metrics'].get('val_accuracy'))} (resumed)")
        return man["metrics"]

    def epoch(self, t: int) -> dict[str, Any]:
        """Augment, train, evaluate; the epoch is done when its manifest is written (last)."""
        cfg, T, ep = self.cfg, self.cfg.mars.epochs, epoch_dir(self.run_dir, t)
        ep.mkdir(parents=True, exist_ok=True)
        scorer = f"r{t - 1}" if t > 1 else ("r0 (warm-up)" if self.warm else "the base model")
        self.log(f"[epoch {t}/{T}] {cfg.mars.strategy}: augment {self.originals.num_rows} pairs, margins from {scorer}")
        t0 = time.perf_counter()
        grown, res, weights = self.augment(t, ep)
        augment_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit = self.train(t, ep, grown, weights)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        test = {k: v for k, v in fit.items() if k.startswith("test_")}
        if (
            self.test_path is not None and "test_accuracy" not in test
        ):  # e.g. a restart that reported its last checkpoint
            test = _test_metrics(cfg, self.splits["test"], fit["model_dir"])
        eval_s = time.perf_counter() - t0
        row = _epoch_row(
            cfg, t, _Counts(self.originals.num_rows, res.synthetic.num_rows, grown.num_rows), res.summary, fit
        )
        row.update({**test, "augment_s": round(augment_s, 2), "train_s": round(train_s, 2), "eval_s": round(eval_s, 2)})
        row = _ordered_row(row, fit)
        self.rows.append(row)
        if self.want_base and self.base is not None:  # kept for a resumed run
            atomic.write_json(self.base_path, self.base)
            self.want_base = False
        self.write_manifest(t, ep, fit, grown, row)
        self.log(
            f"[epoch {t}/{T}] done: val accuracy {_fmt(row.get('val_accuracy'))}, val SNR {_fmt(row.get('val_snr'))}, "
            f"test accuracy {_fmt(row.get('test_accuracy'))} (augment {augment_s:.0f}s, train {train_s:.0f}s)"
        )
        self.prev_model, self.current, self.prev_scores = fit["model_dir"], grown, fit.get("scores_path")
        return row

    def augment(self, t: int, ep: Path) -> tuple[pa.Table, Any, np.ndarray | None]:
        """The strategy's epoch; writes synthetic.parquet, augment_summary.json and train.parquet."""
        scores = pq.read_table(self.prev_scores) if self.prev_scores and Path(self.prev_scores).exists() else None
        ctx = EpochContext(self.cfg, self.originals, self.current, self.prev_model, t, ep, self.log, scores)
        res = self.strategy.augment(ctx)
        syn = res.synthetic
        _write_parquet(syn, ep / "synthetic.parquet")
        atomic.write_json(ep / "augment_summary.json", res.summary)
        grown = pa.concat_tables([self.current, syn.cast(S.PAIR_SCHEMA)]) if syn.num_rows else self.current
        weights = loss_weights(grown, res.loss_weights, self.cfg.train.synthetic_weight)
        to_train = grown.append_column(LOSS_WEIGHT, pa.array(weights, pa.float64())) if weights is not None else grown
        _write_parquet(to_train, ep / "train.parquet")
        return grown, res, weights

    def train(self, t: int, ep: Path, grown: pa.Table, weights: np.ndarray | None) -> FitResult:
        from mars_ray.train.loop import FitSpec, fit_reward_model

        cfg, T = self.cfg, self.cfg.mars.epochs
        n_new = grown.num_rows - self.current.num_rows
        with console.stage(f"[epoch {t}/{T}] train on {grown.num_rows} pairs ({n_new} new)") as st:
            fit = fit_reward_model(
                epoch_config(cfg, t),
                FitSpec(
                    init_model=self.prev_model,
                    train_path=ep / "train.parquet",
                    val_path=self.val_path,
                    run_dir=self.run_dir / "ray_train",
                    name=f"epoch_{t:03d}",
                    weights_column=LOSS_WEIGHT if weights is not None else None,
                    epoch=t,
                    max_failures=cfg.train.max_failures,
                    test_path=self.test_path,
                    test_before=self.want_base and self.base is None and t == 1 and self.warm is None,
                    # the last epoch's scores are the final model's reward statistics (config.json mean/std)
                    score_path=self.run_dir / "data" / "train.parquet"
                    if (self.score_in_training and t < T) or t == T
                    else None,
                ),
            )
            st.done(_fit_result(fit) + f", test accuracy {_fmt(fit.get('test_accuracy'))}")
        if self.want_base and self.base is None:
            self.base = _base_from_fit(fit)
        return fit

    def write_manifest(self, t: int, ep: Path, fit: FitResult, grown: pa.Table, row: dict[str, Any]) -> None:
        manifest = {
            "epoch": t,
            "model_dir": fit["model_dir"],
            "checkpoint_dir": fit["checkpoint_dir"],
            "scores_path": fit.get("scores_path"),
            "init_model": self.prev_model,
            "train_file": str(ep / "train.parquet"),
            "train_pairs": grown.num_rows,
            "synthetic_file": str(ep / "synthetic.parquet"),
            "config_hash": self.cfg.hash(),
            "metrics": row,
        }
        write_metrics(self.run_dir, self.rows)
        atomic.write_json(ep / MANIFEST, manifest)  # last: the epoch is done

    def finish(self) -> dict[str, Any]:
        """The final model (self-describing), the checkpoints dropped, the summary and report."""
        cfg, run_dir = self.cfg, self.run_dir
        write_metrics(run_dir, self.rows)
        if self.want_base:  # not scored by a training run (resumed epochs, a shared r0): score it now
            self.base = self.base or _base_metrics(cfg, self.splits["test"])
            atomic.write_json(self.base_path, self.base)
        final = run_dir / MODEL_DIR
        tmp = run_dir / (MODEL_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(self.prev_model, tmp)
        describe_model(
            cfg,
            run_dir,
            tmp,
            originals=self.originals,
            current=self.current,
            rows=self.rows,
            base=self.base,
            scores_path=self.prev_scores,
        )
        atomic.replace_dir(tmp, final)  # model/ is complete at every moment (the old one until the swap)
        summary = {
            "run_dir": str(run_dir),
            "strategy": cfg.mars.strategy,
            "epochs": cfg.mars.epochs,
            "model": str(final),
            "final": self.rows[-1] if self.rows else {},
            "seconds": round(time.perf_counter() - self.t_run, 1),
            "config_hash": cfg.hash(),
            "warmup": self.warm,
            "base": self.base,
            "checkpoints": self.drop_checkpoints(),
        }
        atomic.write_json(
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
            self.log(f"report not written: {type(e).__name__}: {e}")
        return summary

    def drop_checkpoints(self) -> str:
        if self.cfg.output.keep_checkpoints:
            return "kept"
        freed, left = drop_checkpoints(self.run_dir / "ray_train")
        checkpoints = f"deleted ({freed / 2**20:.0f} MiB)"
        if left:
            checkpoints += f"; could not delete {len(left)}: " + "; ".join(left)
            self.log(f"warning: {checkpoints}")
        return checkpoints


@dataclass(frozen=True)
class _Counts:
    human: int
    new: int
    total: int


def _epoch_row(cfg: Config, t: int, n: _Counts, aug: dict[str, Any], fit: FitResult) -> dict[str, Any]:
    """An epoch's metrics row (metrics.jsonl): the data it trained on and what training reported."""
    return {
        "epoch": t,
        "strategy": cfg.mars.strategy,
        "train_pairs": n.total,
        "original_pairs": n.human,
        "synthetic": n.new,
        "synthetic_total": n.total - n.human,
        "budget": cfg.mars.budget,
        "budget_unspent": int(aug.get("budget_unspent", 0) or 0),
        "synthetic_share": (n.total - n.human) / max(n.total, 1),
        "synthetic_weight": cfg.train.synthetic_weight,
        "passes": epoch_config(cfg, t).train.passes,
        **{k: v for k, v in fit.items() if k.startswith("val_")},
    }


_FIT_KEYS = (
    "train_loss",
    "train_loss_first",
    "train_loss_last",
    "train_tokens_per_s",
    "step_time_s",
    "steps",
    "precision",
    "precision_reason",
    "world_size",
)


def _ordered_row(row: dict[str, Any], fit: FitResult) -> dict[str, Any]:
    """The row's keys in metrics.jsonl's order: data, validation, test, training, times."""
    times = {k: row.pop(k) for k in ("augment_s", "train_s", "eval_s")}
    out = {**row, **{k: fit.get(k) for k in _FIT_KEYS}, **times}
    if fit.get("resumed_from_step") is not None:  # this training run continued a checkpoint inside it
        out["resumed_from_step"] = fit["resumed_from_step"]
    return out


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
