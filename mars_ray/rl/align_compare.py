"""`mars-ray align-compare`: the paper's Table 2 shape.

Given two or more reward models (``rl.reward_models``: run directories from ``mars-ray train`` or
``mars-ray compare``, model folders, hub ids), align one policy per reward model with identical
settings and seed (each reward model deployed in turn on Ray Serve), then judge every pair of
policies head to head with ``mars-ray winrate``'s judge, both orders asked. Rerunning the command
continues where it stopped: finished policies and win-rates are kept.

Writes ``policies/<name>/`` (align directories), ``winrates/<a>_vs_<b>/`` and
``align_compare.json`` / ``align_compare.md`` into ``output.dir``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mars_ray.config import Config
from mars_ray.core.atomic import write_json, write_text


def reward_model_names(refs: list[str]) -> list[str]:
    """Short unique names: a training run's strategy (and seed where needed), else the folder name."""
    base = []
    for ref in refs:
        p = Path(ref)
        name = p.name or ref
        if (p / "config.yaml").exists() and (p / "model").is_dir():
            try:
                c = Config.load(p / "config.yaml")
                name = f"{c.mars.strategy}-seed{c.seed}"
            except ValueError:
                pass
        base.append(re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "rm")
    out = []
    for k, n in enumerate(base):
        out.append(n if base.count(n) == 1 else f"{n}-{k}")
    return out


def align_compare(cfg: Config, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    from mars_ray.rl.align import SUMMARY_FILE, align
    from mars_ray.rl.winrate import winrate
    from mars_ray.runtime import on_reserved_gpus

    cfg.validate()
    refs = list(cfg.rl.reward_models)
    if len(refs) < 2:
        raise ValueError(
            "rl.reward_models needs two or more reward models, e.g. --rl.reward_models '[runs/mars, runs/uniform]'"
        )
    root = Path(cfg.output.dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg.save(root)
    names = reward_model_names(refs)
    policies: dict[str, dict[str, Any]] = {}
    for k, (name, ref) in enumerate(zip(names, refs)):
        sub = copy.deepcopy(cfg)
        sub.output.dir = str(root / "policies" / name)
        sub.output.overwrite = False
        sub.rl.reward_model, sub.rl.reward_url, sub.rl.reward_deploy = ref, None, True
        sub.serve.app_name = f"{cfg.serve.app_name}-{k}"
        d = Path(sub.output.dir)
        if (d / SUMMARY_FILE).exists():
            log(f"align-compare: policy for {name} done earlier ({d})")
            summary = json.loads((d / SUMMARY_FILE).read_text())
        else:
            log(f"align-compare: [{k + 1}/{len(refs)}] aligning a policy against {name} ({ref})")
            summary = align(sub, resume=(d / "config.yaml").exists(), log=log)
        policies[name] = {"reward_model": ref, "dir": str(d), "summary": summary}
    pairs: dict[str, dict[str, Any]] = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = names[i], names[j]
            sub = copy.deepcopy(cfg)
            sub.output.dir = str(root / "winrates" / f"{a}_vs_{b}")
            wpath = Path(sub.output.dir) / "winrate.json"
            if wpath.exists():
                res = json.loads(wpath.read_text())
            else:
                res = on_reserved_gpus(
                    sub.resources, winrate, sub, policies[a]["dir"], policies[b]["dir"], names=(a, b), log=log
                )
            pairs[f"{a} vs {b}"] = {
                k: res.get(k)
                for k in (
                    "policy_a",
                    "policy_b",
                    "win",
                    "tie",
                    "loss",
                    "invalid",
                    "win_rate",
                    "ci_low",
                    "ci_high",
                    "n",
                    "judge",
                )
            }
    result = {
        "reward_models": dict(zip(names, refs)),
        "policies": {n: _policy_row(p) for n, p in policies.items()},
        "pairs": pairs,
        "judge": cfg.rl.judge_model,
        "judge_mode": cfg.rl.judge_mode,
        "seed": cfg.seed,
    }
    write_json(root / "align_compare.json", result, default=float)
    write_text(root / "align_compare.md", compare_markdown(result))
    log((root / "align_compare.md").read_text())
    return result


def _policy_row(p: dict[str, Any]) -> dict[str, Any]:
    s = p["summary"]
    return {
        "reward_model": p["reward_model"],
        "dir": p["dir"],
        "steps": s.get("steps"),
        "final_reward": (s.get("final") or {}).get("reward"),
        "final_kl": (s.get("final") or {}).get("kl"),
        "step_s": (s.get("time_per_step") or {}).get("step_s"),
    }


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(float(x), spec)


def compare_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Policies aligned against each reward model, judged pairwise",
        "",
        "| policy (reward model) | steps | final reward | final KL | s / step |",
        "|---|---|---|---|---|",
    ]
    for n, p in res["policies"].items():
        lines.append(
            f"| {n} (`{p['reward_model']}`) | {p['steps']} | {_f(p['final_reward'])} | {_f(p['final_kl'], '.4f')} "
            f"| {_f(p['step_s'], '.1f')} |"
        )
    lines += [
        "",
        f"Judge `{res['judge']}` ({res['judge_mode']}), both orders; win-rate of the first policy, ties = 1/2.",
        "",
        "| pair | wins | ties | losses | invalid | win-rate | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, w in res["pairs"].items():
        lines.append(
            f"| {k} | {w['win']} | {w['tie']} | {w['loss']} | {w['invalid']} | {_f(w['win_rate'])} "
            f"| [{_f(w['ci_low'])}, {_f(w['ci_high'])}] |"
        )
    return "\n".join(lines) + "\n"
