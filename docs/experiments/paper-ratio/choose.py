"""Apply DESIGN.md's pre-registered tuning rules to the finished tuning candidates.

    python docs/experiments/paper-ratio/choose.py --step 1 --tune runs/paper-ratio/tune-hh --file hh_tune
    python docs/experiments/paper-ratio/choose.py --step 2 --tune runs/paper-ratio/tune-hh --file hh_tune

Step 1 (uniform arm; lr and LoRA vs full; also any step that picks by accuracy alone): the highest
mean tuning accuracy over the tuning seeds.
Step 2 (mars arm; warm-up and margin scale): the highest mean tuning accuracy among candidates whose
ESS/N is below 0.9 in every epoch of both seeds; if none is, the lowest mean ESS/N. Ties (a
difference below 0.002) go to the project default (step 1: lora-1e-3; step 2: mars-warmup1-std).
Prints every candidate's numbers and the choice.

The paper-scale experiment (issue 43) names its own candidates, default and tie margin:

    python docs/experiments/paper-ratio/choose.py --step 1 --tune runs/paper-scale/tune --file hh_tune \
        --candidates full-2e-5,full-5e-5,lora-1e-3 --default full-5e-5 --tie 0.005
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STEP1 = ("lora-1e-3", "lora-3e-3", "full-5e-5", "full-1e-4")
STEP2 = ("mars-warmup0-raw", "mars-warmup0-std", "mars-warmup1-raw", "mars-warmup1-std")
DEFAULT = {1: "lora-1e-3", 2: "mars-warmup1-std"}
TIE = 0.002


def _candidate(d: Path, metric: str) -> dict:
    res = json.loads((d / "compare.json").read_text())
    (strategy,) = res["strategies"]
    accs = res["table"][strategy][metric]["values"]
    ess = []
    for trial in sorted((d / "trials").glob("strategy=*")):
        for f in sorted(trial.glob("epochs/*/augment_summary.json")):
            ess.append(json.loads(f.read_text())["diagnostics"]["ess_ratio"])
    return {"acc": sum(accs) / len(accs), "accs": accs, "ess_max": max(ess), "ess_mean": sum(ess) / len(ess)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, choices=(1, 2), required=True)
    ap.add_argument("--tune", type=Path, required=True)
    ap.add_argument("--file", required=True, help="the tuning file's name, e.g. hh_tune")
    ap.add_argument("--candidates", help="comma-separated candidate names (default: issue 18's for the step)")
    ap.add_argument("--default", help="the candidate a tie goes to (default: issue 18's for the step)")
    ap.add_argument("--tie", type=float, default=TIE, help="a lead below this is a tie")
    args = ap.parse_args()
    names = tuple(args.candidates.split(",")) if args.candidates else (STEP1 if args.step == 1 else STEP2)
    missing = [n for n in names if not (args.tune / n / "compare.json").exists()]
    if missing:
        raise SystemExit(f"not finished: {', '.join(missing)}")
    rows = {n: _candidate(args.tune / n, f"{args.file}:accuracy") for n in names}
    for n, r in rows.items():
        accs = ", ".join(f"{a:.4f}" for a in r["accs"])
        print(f"{n}: mean {r['acc']:.4f} ({accs}); ESS/N max {r['ess_max']:.3f}, mean {r['ess_mean']:.3f}")
    pool = rows
    if args.step == 2:
        pool = {n: r for n, r in rows.items() if r["ess_max"] < 0.9}
        if not pool:
            best = min(rows, key=lambda n: rows[n]["ess_mean"])
            print(f"no candidate has ESS/N < 0.9 in every epoch: the lowest mean ESS/N, {best}")
            return 0
    best = max(pool, key=lambda n: pool[n]["acc"])
    d = args.default or DEFAULT[args.step]
    if best != d and d in pool and pool[best]["acc"] - pool[d]["acc"] < args.tie:
        print(f"{best} leads {d} by less than {args.tie}: the default, {d}")
        best = d
    print(f"chosen: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
