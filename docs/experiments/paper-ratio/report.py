"""Issue 18's tables from the kept trial directories (the source of truth, not the compare reports).

    python docs/experiments/paper-ratio/report.py --run runs/paper-ratio/hh \
        --run runs/paper-ratio/hh-secondary --heldout hh_heldout --pair mars:mars-nosem > runs/paper-ratio/hh-report.md

``--run DIR`` (repeatable): a `mars-ray compare` directory; ``DIR=label`` names its arm (when a
directory holds one strategy, e.g. the tuning candidates). ``--heldout NAME``: the primary held-out
file's evaluation (``trials/*/heldout/<i>_<NAME>/``). Printed (markdown): per arm mean ± sd over
seeds of the held-out accuracy and SNR; the paired differences by seed (t-test, 95% t-interval) and
the pair-level paired bootstrap, for every arm against ``--baseline`` and against ``none`` and for
each ``--pair A:B``; the per-epoch allocation diagnostics and generation-bank counts averaged over
seeds; the cross-dataset held-out sets of ``crosseval.sh``; compute time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.core.metrics import pair_bootstrap, paired_comparison


def _trials(run: Path, label: str | None, heldout: str) -> dict[tuple[str, int], Path]:
    """Finished trials (held-out evaluation written) of one compare directory, by (arm, seed)."""
    out = {}
    strategies = set()
    for d in sorted((run / "trials").glob("strategy=*_seed=*")):
        strategy, seed = d.name.removeprefix("strategy=").rsplit("_seed=", 1)
        strategies.add(strategy)
        if not list(d.glob(f"heldout/*_{heldout}/scores.npz")):
            continue  # unfinished
        out[(label or strategy, int(seed))] = d
    if label and len(strategies) > 1:
        raise SystemExit(f"{run}=label: it holds {len(strategies)} strategies; a label names a one-strategy run")
    return out


def _heldout(trial: Path, name: str) -> tuple[dict[str, Any], dict[str, bool]]:
    hits = sorted(trial.glob(f"heldout/*_{name}"))
    if len(hits) != 1:
        raise SystemExit(f"{trial}: expected one heldout/*_{name} evaluation, found {len(hits)}")
    ev = json.loads((hits[0] / "eval.json").read_text())
    z = np.load(hits[0] / "scores.npz")
    correct = dict(zip(z["pair_id"].tolist(), (z["r_chosen"] > z["r_rejected"]).tolist()))
    return ev, correct


def _fmt(x: float, nd: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def _comparisons(arms: list[str], refs: list[str], extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(arm, reference) pairs to test: every arm against each reference (``none`` only as a
    reference, never against the baseline), then the ``--pair`` comparisons."""
    out = [(a, r) for r in refs for a in sorted(arms) if a != r and (r == "none" or a != "none")]
    return out + [p for p in extra if p not in out]


def _cross(arms: dict[str, dict[int, Path]], pairs: list[tuple[str, str]]) -> None:
    """The cross-dataset held-out sets (``crosseval.sh``: ``trials/*/heldout-x/<name>/eval.json``):
    per arm mean ± sd of the accuracy, and each arm against each reference paired by seed."""
    acc: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for arm, by_seed in arms.items():
        for seed, d in by_seed.items():
            for f in sorted(d.glob("heldout-x/*/eval.json")):
                acc[f.parent.name][arm][seed] = json.loads(f.read_text())["accuracy"]
    if not acc:
        return
    print("\n### Cross-dataset held-out sets (`crosseval.sh`; each trial's final model)\n")
    print("| held-out set | arm | seeds | accuracy, mean ± sd |")
    print("|---|---|---|---|")
    for name in sorted(acc):
        for arm in sorted(acc[name]):
            a = np.array(list(acc[name][arm].values()))
            sd = a.std(ddof=1) if len(a) > 1 else float("nan")
            print(f"| {name} | {arm} | {len(a)} | {a.mean():.4f} ± {_fmt(float(sd))} |")
    print("\n| held-out set | difference | seeds | mean | sd | p (two-sided) | 95% t-interval |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(acc):
        for arm, ref in pairs:
            if arm not in acc[name] or ref not in acc[name]:
                continue
            seeds = sorted(set(acc[name][arm]) & set(acc[name][ref]))
            if len(seeds) < 2:
                continue
            pc = paired_comparison([acc[name][arm][s] for s in seeds], [acc[name][ref][s] for s in seeds])
            print(
                f"| {name} | {arm} − {ref} | {pc['n']} | {pc['mean_diff']:+.4f} | {_fmt(pc['std_diff'])} | "
                f"{_fmt(pc['p_value'], 3)} | [{pc['ci_low']:+.4f}, {pc['ci_high']:+.4f}] |"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--baseline", default="uniform")
    ap.add_argument("--pair", action="append", default=[], metavar="A:B", help="also test arm A − arm B")
    args = ap.parse_args()

    trials: dict[tuple[str, int], Path] = {}
    for spec in args.run:
        path, _, label = spec.partition("=")
        for key, d in _trials(Path(path), label or None, args.heldout).items():
            if key in trials:
                raise SystemExit(f"arm {key[0]} seed {key[1]} appears in two runs ({trials[key]}, {d})")
            trials[key] = d
    arms: dict[str, dict[int, Path]] = defaultdict(dict)
    for (arm, seed), d in trials.items():
        arms[arm][seed] = d

    acc: dict[str, dict[int, float]] = defaultdict(dict)
    snr: dict[str, dict[int, float]] = defaultdict(dict)
    correct: dict[str, dict[int, dict[str, bool]]] = defaultdict(dict)
    seconds: dict[str, list[float]] = defaultdict(list)
    for arm, by_seed in arms.items():
        for seed, d in by_seed.items():
            ev, corr = _heldout(d, args.heldout)
            acc[arm][seed], snr[arm][seed], correct[arm][seed] = ev["accuracy"], ev.get("snr"), corr
            seconds[arm].append(json.loads((d / "summary.json").read_text())["seconds"])

    print(f"### Held-out `{args.heldout}` (each trial's final model)\n")
    print("| arm | seeds | accuracy, mean ± sd | SNR, mean ± sd | pairs | minutes per trial (median, training run) |")
    print("|---|---|---|---|---|---|")
    for arm in sorted(arms):
        a, s = np.array(list(acc[arm].values())), np.array([v for v in snr[arm].values() if v is not None])
        n_pairs = len(next(iter(correct[arm].values())))
        print(
            f"| {arm} | {len(a)} | {a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else float('nan'):.4f} | "
            f"{_fmt(s.mean() if len(s) else None, 3)} ± {_fmt(s.std(ddof=1) if len(s) > 1 else None, 3)} | "
            f"{n_pairs} | {np.median(seconds[arm]) / 60:.1f} |"
        )

    print("\n### Paired differences (by seed; positive = the first arm ahead)\n")
    print("t-test and t-interval: each trial's accuracy on the whole file, paired by seed; bootstrap: the")
    print("pairs every trial of both arms scored, resampled (5,000 replicates) with the seeds averaged.\n")
    print("| difference | seeds | mean | sd | t | p (two-sided) | 95% t-interval | pair bootstrap 95% |")
    print("|---|---|---|---|---|---|---|---|")
    refs = list(dict.fromkeys(r for r in (args.baseline, "none") if r in arms))
    extra = [(a, b) for a, _, b in (p.partition(":") for p in args.pair)]
    for a, b in extra:
        if a not in arms or b not in arms:
            raise SystemExit(f"--pair {a}:{b}: arms present are {sorted(arms)}")
    pairs = _comparisons(list(arms), refs, extra)
    for arm, ref in pairs:
        seeds = sorted(set(acc[arm]) & set(acc[ref]))
        if len(seeds) < 2:
            continue
        pc = paired_comparison([acc[arm][s] for s in seeds], [acc[ref][s] for s in seeds])
        ids = sorted(set.intersection(*(set(correct[x][s]) for x in (arm, ref) for s in seeds)))
        ca = np.array([[correct[arm][s][i] for i in ids] for s in seeds])
        cb = np.array([[correct[ref][s][i] for i in ids] for s in seeds])
        pb = pair_bootstrap(ca, cb)
        print(
            f"| {arm} − {ref} | {pc['n']} | {pc['mean_diff']:+.4f} | {_fmt(pc['std_diff'])} | {_fmt(pc['t'], 2)} | "
            f"{_fmt(pc['p_value'], 3)} | [{pc['ci_low']:+.4f}, {pc['ci_high']:+.4f}] | "
            f"[{pb['ci_low']:+.4f}, {pb['ci_high']:+.4f}] ({pb['n_pairs']} pairs) |"
        )

    print("\n### Allocation diagnostics and the generation bank, per epoch (mean over seeds)\n")
    keys = ("ess_ratio", "budget_share_misranked", "max_budget", "margin_std", "gate_pass_rate")
    print(
        "| arm | epoch | ESS/N | budget share on mis-ranked | max bᵢ | margin sd | gate pass rate | bank hits | misses"
        " | generated |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in sorted(arms):
        epochs = sorted({p.name for d in arms[arm].values() for p in (d / "epochs").glob("0*")})
        for ep in epochs:
            vals: dict[str, list[float]] = defaultdict(list)
            for d in arms[arm].values():
                f = d / "epochs" / ep / "augment_summary.json"
                if not f.exists():
                    continue
                summ = json.loads(f.read_text())
                diag = summ.get("diagnostics") or {}
                for k in keys:
                    if diag.get(k) is not None:
                        vals[k].append(float(diag[k]))
                bank = summ.get("bank") or {}
                for k in ("hits", "misses", "generated"):
                    if bank.get(k) is not None:
                        vals[k].append(float(bank[k]))
            if not vals:
                continue
            cells = [_fmt(np.mean(vals[k]) if vals[k] else None, 3) for k in keys]
            cells += [_fmt(np.mean(vals[k]) if vals[k] else None, 0) for k in ("hits", "misses", "generated")]
            print(f"| {arm} | {int(ep)} | " + " | ".join(cells) + " |")

    _cross(arms, pairs)

    total = sum(sum(v) for v in seconds.values())
    print(
        f"\nCompute: {len(trials)} trials, {total / 3600:.1f} h of trial time on this machine (a resumed trial"
        " counts its last process only; held-out evaluation not included)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
