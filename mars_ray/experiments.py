"""Many MARS runs at once on Ray Tune: `mars-ray compare` (strategies x seeds) and
`mars-ray sweep` (tau, budget or any config field).

Every trial is a full `mars-ray train` (Ray Data stages and Ray Train inside the trial) in its own
run directory under ``ROOT/trials/``, reporting its metrics row to Tune after every epoch. All
trials share one generation cache (``model.cache_dir``), so an identical paraphrase request is
generated once across trials, reruns and sweeps.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.config import Config
from mars_ray.core.atomic import write_json, write_text

TRIAL_DIR = "trials"
EXPERIMENT = "tune"


def _trial_slug(overrides: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", ",".join(parts))[:120] or "default"


def trial_config(base: dict[str, Any], overrides: dict[str, Any], root: str) -> Config:
    cfg = Config.from_dict(base, source="base config")
    for k, v in overrides.items():
        cfg.set(k, v, source="trial")
    cfg.output.dir = str(Path(root) / TRIAL_DIR / _trial_slug(overrides))
    cfg.output.overwrite = False
    cfg.resources.ray_address = None  # the trial runs inside the cluster Tune already joined
    return cfg.validate()


def mars_trial(config: dict[str, Any]) -> None:
    """A Ray Tune function trainable: one full MARS loop; a metrics row per epoch.

    On a restored experiment the run directory continues at its last finished epoch, and epochs
    reported before the interruption (recorded in the trial checkpoint) are not reported twice.
    """
    import tempfile

    from ray import tune

    from mars_ray.evaluate import evaluate
    from mars_ray.pipeline import run_mars
    from mars_ray.runtime import on_reserved_gpus

    overrides = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = trial_config(config["_base"], overrides, config["_root"])
    run_dir = Path(cfg.output.dir)
    resume = (run_dir / "config.yaml").exists()
    reported = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            reported = int(json.loads((Path(d) / "reported.json").read_text())["epoch"])

    def report(row: dict[str, Any]) -> None:
        if int(row["epoch"]) <= reported:
            return
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        metrics["run_dir"] = str(run_dir)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "reported.json").write_text(json.dumps({"epoch": int(row["epoch"])}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    summary = run_mars(cfg, resume=resume, log=lambda m: None, on_epoch=report)
    for k, path in enumerate(config.get("_eval_paths") or []):
        ecfg = heldout_config(cfg, path, config.get("_eval_max_pairs"))
        ecfg.eval.exclude_pairs = str(run_dir) if config.get("_exclude_training", True) else None
        ecfg.output.dir = str(run_dir / "heldout" / f"{k}_{Path(path).stem}")
        if not (Path(ecfg.output.dir) / "eval.json").exists():
            on_reserved_gpus(ecfg.resources, evaluate, ecfg, summary["model"], log=lambda m: None)  # the trial's GPU


def heldout_config(cfg: Config, path: str, max_pairs: int | None) -> Config:
    """The trial's config for evaluating on another file: that file's own format (detected), every
    pair of it or ``max_pairs`` of them, no column mapping or PKU label carried over."""
    import dataclasses

    ecfg = cfg.copy(source="trial")
    # One held-out subset for every trial (data.seed, else 0), so trials compare on the same pairs.
    ecfg.data = dataclasses.replace(
        type(cfg.data)(),
        path=path,
        max_pairs=max_pairs,
        seed=cfg.data.seed if cfg.data.seed is not None else 0,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
        tokenizer=cfg.data.tokenizer,
    )
    return ecfg


PATH_KEYS = (
    "data.path",
    "model.reward",
    "model.encoder",
    "model.cache_dir",
    "rewrite.model",
    "paraphrase.model",
    "data.tokenizer",
)


def _abs(value: str) -> str:
    return str(Path(value).resolve()) if Path(value).exists() else value


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose local paths are absolute: a trial runs in another working directory
    (Ray Tune's trial directory), where a relative path would point elsewhere."""
    out = cfg.copy(source="experiment")
    for key in PATH_KEYS:
        v = out.get(key)
        if isinstance(v, str) and v and not v.startswith("builtin:"):
            out.set(key, str(Path(v).resolve()) if key == "model.cache_dir" else _abs(v))
    out.compare.eval_paths = [_abs(x) for x in out.compare.eval_paths]
    return out


def run_trials(
    cfg: Config,
    param_space: dict[str, Any],
    *,
    root: Path,
    metric: str,
    mode: str,
    scheduler: str,
    max_concurrent: int,
    num_samples: int = 1,
    search: str = "grid",
    eval_paths: list[str] | None = None,
    restore: bool = False,
    log: Callable[[str], None] = print,
):
    """Run (or restore) the Tune experiment under ``root``; returns the ResultGrid."""
    from ray import tune

    from mars_ray.runtime import init_ray

    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg = absolute_paths(cfg)
    eval_paths = [_abs(x) for x in (eval_paths or [])]
    init_ray(cfg.resources)
    trainable = tune.with_resources(mars_trial, {"cpu": cfg.tune.trial_cpus})
    exp = root / EXPERIMENT
    if restore and not tune.Tuner.can_restore(str(exp)):
        if any((root / TRIAL_DIR).glob("*")):
            raise ValueError(f"{exp}: trials ran here but Tune's state is missing; nothing to restore from")
        # Interrupted before Tune wrote its first state (e.g. during the bank build): nothing ran
        # yet, so starting the trials from the saved experiment config is the resume.
        log(f"{exp}: no Tune state yet (interrupted before the first trial); starting the trials")
        restore = False
    if restore:
        log(f"restoring the Tune experiment in {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    space = dict(param_space)
    space.update(
        _base=cfg.to_dict(),
        _root=str(root),
        _eval_paths=list(eval_paths or []),
        _exclude_training=bool(cfg.compare.exclude_training),
        _eval_max_pairs=cfg.compare.eval_max_pairs,
    )
    sched = None
    if scheduler == "asha":
        sched = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=max(1, cfg.mars.epochs), grace_period=1, reduction_factor=2
        )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, scheduler=sched, num_samples=num_samples, max_concurrent_trials=max_concurrent
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(root), verbose=0, failure_config=tune.FailureConfig(max_failures=1)
        ),
    )
    return tuner.fit()


def trial_rows(root: Path) -> list[dict[str, Any]]:
    """Every trial's final metrics, its config overrides and held-out evaluations, from the run
    directories (the source of truth, also after a restore)."""
    from mars_ray.pipeline import read_metrics

    out = []
    for d in sorted((root / TRIAL_DIR).glob("*")):
        summ = d / "summary.json"
        if not summ.exists():
            continue
        rows = read_metrics(d)
        cfg = Config.load(d / "config.yaml")
        row = {
            "run_dir": str(d),
            "strategy": cfg.mars.strategy,
            "seed": cfg.seed,
            "tau": cfg.mars.tau,
            "budget": cfg.mars.budget,
            "epochs": rows,
            "final": rows[-1] if rows else {},
            "synthetic_total": int(rows[-1].get("synthetic_total", 0)) if rows else 0,
            "augment_s": float(sum(r.get("augment_s", 0.0) or 0.0 for r in rows)),
            "heldout": {},
        }
        for e in sorted((d / "heldout").glob("*/eval.json")):
            res = json.loads(e.read_text())
            res["_dir"] = str(e.parent)
            row["heldout"][Path(res["data"]).stem] = res
        out.append(row)
    return out


# ------------------------------------------------------------------------------ compare


COMPARE_METRICS = ("test_accuracy", "test_snr", "val_accuracy", "val_snr")


def check_trainable_in_tune(cfg: Config, command: str) -> None:
    """Each trial trains with Ray Train inside a Ray Tune trial; its local mode (no workers) cannot
    run there (``ray.train.get_context`` is refused inside a Tune function)."""
    if cfg.train.num_workers == 0:
        raise ValueError(
            f"train.num_workers=0 trains in the calling process, which `mars-ray {command}` cannot do inside its "
            "Ray Tune trials; use train.num_workers 1 (or more)"
        )


def compare(cfg: Config, *, restore: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Strategies x seeds on the same data, subset and budget; a table of mean ± std per metric per
    strategy, paired differences vs ``uniform`` and ``none`` (paired t-test across seeds with its
    t-interval; on held-out files also a pair-level paired bootstrap), synthetic pairs and generation time per strategy. Writes ``compare.json``, ``compare.md``,
    ``compare.html`` and plots into ``cfg.output.dir``."""
    from ray import tune

    from mars_ray.pipeline import STRATEGIES

    check_trainable_in_tune(cfg, "compare")
    bad = [s for s in cfg.compare.strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"compare.strategies: unknown {bad}; choose from {', '.join(STRATEGIES)}")
    if not cfg.compare.seeds:
        raise ValueError("compare.seeds is empty")
    root = Path(cfg.output.dir)
    t0 = time.perf_counter()
    n = len(cfg.compare.strategies) * len(cfg.compare.seeds)
    log(
        f"compare: {len(cfg.compare.strategies)} strategies x {len(cfg.compare.seeds)} seeds = {n} runs of "
        f"{cfg.mars.epochs} epoch(s), budget {cfg.mars.budget}, data {cfg.data.path}"
    )
    if cfg.bank.before_compare and {"uniform", "mars", "mars-nosem"} & set(cfg.compare.strategies):
        _bank_for_trials(cfg, log)
    space = {
        "mars.strategy": tune.grid_search(list(cfg.compare.strategies)),
        "seed": tune.grid_search(list(cfg.compare.seeds)),
    }
    grid = run_trials(
        cfg,
        space,
        root=root,
        metric="val_accuracy",
        mode="max",
        scheduler="fifo",
        max_concurrent=cfg.compare.max_concurrent,
        eval_paths=cfg.compare.eval_paths,
        restore=restore,
        log=log,
    )
    failed = [r for r in grid if r.error is not None]
    if len(failed) == n:
        raise TrialsFailed(f"compare: all {n} trials failed; {_failures(failed)}")
    result = summarise_compare(trial_rows(root), cfg)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(root / "compare.json", result, default=float)
    from mars_ray.report import compare_report

    compare_report(result, trial_rows(root), root)
    log(result["table_md"])
    if failed:  # the report holds the finished trials; the run still fails, loudly
        raise TrialsFailed(
            f"compare: {len(failed)} of {n} trials failed (the report covers the others); {_failures(failed)}; "
            "`mars-ray compare --resume` retries them"
        )
    return result


class TrialsFailed(RuntimeError):
    """Trials of a compare failed (after Tune's retry); the message names them and their errors."""


def _failures(failed: list) -> str:
    """The failed trials' overrides and the last line of each error."""
    out = []
    for r in failed[:5]:
        over = {k: v for k, v in (r.config or {}).items() if not k.startswith("_")}
        last = str(r.error).strip().splitlines()[-1] if str(r.error).strip() else type(r.error).__name__
        out.append(f"{over}: {last}")
    more = f" (+{len(failed) - 5} more)" if len(failed) > 5 else ""
    return "; ".join(out) + more


def _bank_for_trials(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The generation bank for every training pair any trial will see (the union over the seeds'
    subsets), built once before the trials."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mars_ray.bank import build_bank
    from mars_ray.core import schema as S
    from mars_ray.data.load import read_preferences

    parts, seen, sizes = [], set(), []
    for seed in cfg.compare.seeds:
        t = read_preferences(cfg.data, seed=seed).table
        t = t.filter(pc.equal(t.column(S.SPLIT), "train"))
        sizes.append(t.num_rows)
        keep = [i for i, pid in enumerate(t.column(S.PAIR_ID).to_pylist()) if pid not in seen]
        seen.update(t.column(S.PAIR_ID).to_pylist())
        parts.append(t.take(pa.array(keep, type=pa.int64())))
    pairs = pa.concat_tables(parts)
    log(f"compare: generation bank for {pairs.num_rows} training pairs (the union over {len(cfg.compare.seeds)} seeds)")
    return build_bank(absolute_paths(cfg), pairs, run_pairs=min(sizes), log=log)


def summarise_compare(trials: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    from mars_ray.core.metrics import paired_comparison

    metrics = list(COMPARE_METRICS)
    heldout_names = sorted({k for t in trials for k in t["heldout"]})
    for h in heldout_names:
        metrics.append(f"{h}:accuracy")

    def value(t: dict[str, Any], m: str) -> float:
        if ":" in m:
            name, key = m.split(":")
            v = t["heldout"].get(name, {}).get(key)
        else:
            v = t["final"].get(m)
        return float(v) if v is not None else float("nan")

    by_strategy: dict[str, dict[int, dict[str, Any]]] = {}
    for t in trials:
        by_strategy.setdefault(t["strategy"], {})[int(t["seed"])] = t
    table: dict[str, dict[str, Any]] = {}
    for s, seeds in by_strategy.items():
        row: dict[str, Any] = {"seeds": sorted(seeds)}
        for m in metrics:
            vals = np.array([value(seeds[k], m) for k in sorted(seeds)])
            row[m] = {
                "mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"),
                "std": float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else float("nan"),
                "values": vals.tolist(),
            }
        row["synthetic_pairs"] = float(np.mean([seeds[k]["synthetic_total"] for k in seeds]))
        row["augment_s"] = float(np.mean([seeds[k]["augment_s"] for k in seeds]))
        table[s] = row
    paired: dict[str, dict[str, Any]] = {}
    for ref in ("uniform", "none"):
        if ref not in by_strategy:
            continue
        for s in by_strategy:
            if s == ref:
                continue
            common = sorted(set(by_strategy[s]) & set(by_strategy[ref]))
            if not common:
                continue
            for m in metrics:
                a = np.array([value(by_strategy[s][k], m) for k in common])
                b = np.array([value(by_strategy[ref][k], m) for k in common])
                ok = np.isfinite(a) & np.isfinite(b)
                if ok.sum() == 0:
                    continue
                paired[f"{s} - {ref} | {m}"] = {
                    "strategy": s,
                    "reference": ref,
                    "metric": m,
                    **paired_comparison(a[ok], b[ok]),
                }
    pairs_level = _pair_level(by_strategy, seed=cfg.seed)
    from mars_ray.report import fmt

    lines = [
        "| strategy | seeds | " + " | ".join(metrics) + " | synthetic pairs | generation s |",
        "|" + "---|" * (len(metrics) + 4),
    ]
    for s, row in table.items():
        cells = [
            f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" if np.isfinite(row[m]["std"]) else fmt(row[m]["mean"])
            for m in metrics
        ]
        lines.append(
            f"| {s} | {len(row['seeds'])} | "
            + " | ".join(cells)
            + f" | {row['synthetic_pairs']:.0f} | {row['augment_s']:.0f} |"
        )
    return {
        "strategies": list(table),
        "seeds": sorted({int(t["seed"]) for t in trials}),
        "metrics": metrics,
        "budget": cfg.mars.budget,
        "epochs": cfg.mars.epochs,
        "data": cfg.data.path,
        "table": table,
        "paired": paired,
        "paired_pairs": pairs_level,
        "table_md": "\n".join(lines),
        "trials": len(trials),
    }


def _heldout_correct(trial: dict[str, Any], name: str) -> dict[str, bool] | None:
    """pair id -> ranked right, from a trial's held-out ``scores.npz`` (None when it has none)."""
    res = trial["heldout"].get(name)
    if not res or not res.get("_dir"):
        return None
    f = Path(res["_dir"]) / "scores.npz"
    if not f.exists():
        return None
    z = np.load(f, allow_pickle=False)
    return dict(zip(z["pair_id"].tolist(), (z["r_chosen"] > z["r_rejected"]).tolist()))


def _pair_level(by_strategy: dict[str, dict[int, dict[str, Any]]], *, seed: int) -> dict[str, Any]:
    """Secondary analysis: for every held-out file, strategy and reference (uniform, none), a
    pair-level paired bootstrap of the accuracy difference on the pairs every seed of both arms
    was scored on."""
    from mars_ray.core.metrics import pair_bootstrap

    names = sorted({h for seeds in by_strategy.values() for t in seeds.values() for h in t["heldout"]})
    out: dict[str, Any] = {}
    for ref in ("uniform", "none"):
        if ref not in by_strategy:
            continue
        for s in by_strategy:
            if s == ref:
                continue
            common = sorted(set(by_strategy[s]) & set(by_strategy[ref]))
            for name in names:
                per = [
                    (_heldout_correct(by_strategy[s][k], name), _heldout_correct(by_strategy[ref][k], name))
                    for k in common
                ]
                if not per or any(a is None or b is None for a, b in per):
                    continue
                ids = sorted(set.intersection(*(set(a) & set(b) for a, b in per)))
                if not ids:
                    continue
                ca = np.array([[a[i] for i in ids] for a, _ in per])
                cb = np.array([[b[i] for i in ids] for _, b in per])
                out[f"{s} - {ref} | {name}:accuracy"] = {
                    "strategy": s,
                    "reference": ref,
                    "heldout": name,
                    **pair_bootstrap(ca, cb, seed=seed),
                }
    return out


# ------------------------------------------------------------------------------ sweep


def sweep(cfg: Config, *, restore: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A Ray Tune search over ``tune.space`` (dotted config keys -> candidate values; ``grid``
    tries every combination, ``random`` draws ``num_samples`` of them), each trial a full MARS loop
    reporting every epoch so ASHA can stop weak trials early. Writes ``sweep.json``, ``sweep.md``
    and ``sweep.html`` (table + metric vs each swept key) and ``best_config.yaml``, the best trial's
    resolved config, which ``mars-ray train --config`` runs as is."""
    from ray import tune

    check_trainable_in_tune(cfg, "sweep")
    if not cfg.tune.space and not restore:
        raise ValueError("tune.space is empty: give the values to try, e.g. --tune.space '{\"mars.tau\": [0.1, 1.0]}'")
    root = Path(cfg.output.dir)
    space: dict[str, Any] = {}
    for key, values in cfg.tune.space.items():
        space[key] = tune.grid_search(list(values)) if cfg.tune.search == "grid" else tune.choice(list(values))
    log(
        f"sweep: {', '.join(f'{k} in {v}' for k, v in cfg.tune.space.items())} ({cfg.tune.search}, "
        f"scheduler {cfg.tune.scheduler}, metric {cfg.tune.metric} {cfg.tune.mode})"
    )
    grid = run_trials(
        cfg,
        space,
        root=root,
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        scheduler=cfg.tune.scheduler,
        max_concurrent=cfg.tune.max_concurrent,
        num_samples=cfg.tune.num_samples if cfg.tune.search == "random" else 1,
        restore=restore,
        log=log,
    )
    rows = []
    for r in grid:
        if r.config is None:
            continue
        over = {k: v for k, v in r.config.items() if not k.startswith("_")}
        m = r.metrics or {}
        rows.append(
            {
                "overrides": over,
                "epochs_reported": m.get("training_iteration"),
                cfg.tune.metric: m.get(cfg.tune.metric),
                "val_snr": m.get("val_snr"),
                "run_dir": m.get("run_dir"),
                "error": str(r.error) if r.error else None,
            }
        )
    ok = [r for r in rows if r[cfg.tune.metric] is not None]
    if not ok:
        raise RuntimeError(f"sweep: no trial reported {cfg.tune.metric}; see {root / EXPERIMENT}")
    sign = 1 if cfg.tune.mode == "max" else -1
    # The best trial among those that ran every epoch (ASHA stops the others early).
    full = [r for r in ok if (r["epochs_reported"] or 0) >= cfg.mars.epochs] or ok
    best = max(full, key=lambda r: sign * float(r[cfg.tune.metric]))
    best_cfg = Config.load(Path(best["run_dir"]) / "config.yaml")
    best_cfg.output.dir = str(root / "best_run")
    best_cfg.output.overwrite = False
    best_path = root / "best_config.yaml"
    write_text(best_path, best_cfg.to_yaml())
    result = {
        "metric": cfg.tune.metric,
        "mode": cfg.tune.mode,
        "space": cfg.tune.space,
        "trials": rows,
        "best": best,
        "best_config": str(best_path),
    }
    write_json(root / "sweep.json", result, default=str)
    from mars_ray.report import sweep_report

    sweep_report(result, root)
    log(f"best: {best['overrides']} -> {cfg.tune.metric} {best[cfg.tune.metric]:.4f}; config {best_path}")
    return result
