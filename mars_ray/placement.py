"""Will a job fit its cluster? The Ray resources each phase of a ``mars-ray`` command holds at
once, and a check that reserves them on a running cluster (``mars-ray cluster-check``).

A phase is what runs at the same time: a Ray Data stage pool, the training workers, the serve
replicas beside the policy workers, the concurrent trials of a comparison. Phases of one command
run one after another, so each must fit on its own; a phase that does not fit stays pending
forever on a real cluster (Ray waits for resources that never come) instead of failing.

The shapes mirror what the code asks Ray for (keep them in step):

- a stage pool: ``ActorPoolStrategy(size=resources.actors)`` actors of ``actor_cpus`` CPUs and
  ``resources.gpus_per_actor`` GPUs (``stages/common.py``, ``stages/score.py``); the bank's pool
  has ``bank.actors`` of them;
- training: ``ScalingConfig(num_workers, use_gpu, {"CPU": cpus_per_worker or 1})`` (``train/loop.py``);
- serving: the initial replicas of ``serve/app.py: deployment_options``;
- the policy stage: ``rl.num_workers`` workers (``rl/align.py``), plus its reward replicas when it
  deploys them;
- eval and win-rates: one task of ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs when
  ``gpus_per_actor`` > 0 (``runtime.on_reserved_gpus``), else the driver;
- compare and sweep: ``max_concurrent`` trials, each holding its Tune bundle (``tune.trial_cpus``)
  and, at its largest, its stage pool or its training workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mars_ray.config import Config

Bundle = dict[str, float]

COMMANDS = (
    "prepare",
    "bank",
    "augment",
    "train",
    "eval",
    "compare",
    "sweep",
    "serve",
    "align",
    "winrate",
    "align-compare",
)


@dataclass(frozen=True)
class Phase:
    """One step of a command and the bundles it holds at once (empty: it runs in the driver)."""

    name: str
    bundles: tuple[Bundle, ...]

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0.0) for b in self.bundles)

    @property
    def cpus(self) -> float:
        return sum(b.get("CPU", 0.0) for b in self.bundles)


def _bundle(cpus: float, gpus: float = 0.0) -> Bundle:
    b = {"CPU": float(cpus)}
    if gpus:
        b["GPU"] = float(gpus)
    return b


def pool_bundles(cfg: Config, actors: int | None = None) -> tuple[Bundle, ...]:
    res = cfg.resources
    if res.in_process:
        return ()
    cpus = float(res.cpus_per_actor) if res.cpus_per_actor is not None else 1.0
    return tuple(_bundle(cpus, res.gpus_per_actor) for _ in range(int(actors or res.actors)))


def train_bundles(cfg: Config) -> tuple[Bundle, ...]:
    t = cfg.train
    if t.num_workers == 0:  # in the driver
        return ()
    cpus = float(t.cpus_per_worker) if t.cpus_per_worker is not None else 1.0
    return tuple(_bundle(cpus, 1.0 if t.use_gpu else 0.0) for _ in range(t.num_workers))


def serve_bundles(cfg: Config) -> tuple[Bundle, ...]:
    s = cfg.serve
    n = int(s.num_replicas)
    if s.max_replicas is not None:
        lo = 1 if s.min_replicas is None else int(s.min_replicas)
        n = min(max(n, lo, 1), int(s.max_replicas))
    return tuple(_bundle(s.num_cpus, s.num_gpus) for _ in range(n))


def task_bundles(cfg: Config) -> tuple[Bundle, ...]:
    res = cfg.resources
    if not res.gpus_per_actor:
        return ()
    cpus = float(res.cpus_per_actor) if res.cpus_per_actor is not None else 1.0
    return (_bundle(cpus, res.gpus_per_actor),)


def policy_bundles(cfg: Config) -> tuple[Bundle, ...]:
    r = cfg.rl
    cpus = float(r.cpus_per_worker) if r.cpus_per_worker is not None else 1.0
    return tuple(_bundle(cpus, 1.0 if r.use_gpu else 0.0) for _ in range(r.num_workers))


def _largest(*options: tuple[Bundle, ...]) -> tuple[Bundle, ...]:
    return max(options, key=lambda bs: (Phase("", bs).gpus, Phase("", bs).cpus))


def command_phases(command: str, cfg: Config) -> list[Phase]:
    """The phases of ``mars-ray COMMAND`` run with ``cfg`` (see the module docstring)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    pool = pool_bundles(cfg)
    if command == "prepare":
        return [Phase("prepare (driver)", ())]
    if command == "bank":
        return [Phase("bank: generation and embedding pool", pool_bundles(cfg, cfg.bank.actors))]
    if command == "augment":
        return [Phase("augment: stage pools (score, embed, rewrite, paraphrase)", pool)]
    if command == "train":
        return [
            Phase("train: stage pools (score, embed, rewrite, paraphrase)", pool),
            Phase("train: training workers", train_bundles(cfg)),
        ]
    if command in ("eval", "winrate"):
        return [Phase(f"{command}: model task", task_bundles(cfg))]
    if command == "serve":
        return [Phase("serve: reward replicas", serve_bundles(cfg))]
    if command == "align":
        deployed = serve_bundles(cfg) if cfg.rl.reward_deploy else ()
        return [
            Phase("align: policy workers" + (" + reward replicas" if deployed else ""), policy_bundles(cfg) + deployed)
        ]
    if command == "align-compare":
        return [
            Phase("align-compare: policy workers + reward replicas", policy_bundles(cfg) + serve_bundles(cfg)),
            Phase("align-compare: win-rate generation task", task_bundles(cfg)),
        ]
    # compare / sweep: the bank first (compare), then the concurrent trials
    if command == "compare":
        n_trials = len(cfg.compare.strategies) * len(cfg.compare.seeds)
        concurrent = min(int(cfg.compare.max_concurrent), n_trials)
    else:
        concurrent = min(int(cfg.tune.max_concurrent), int(cfg.tune.num_samples) or 1)
    trial = (_bundle(cfg.tune.trial_cpus),) + _largest(pool, train_bundles(cfg), task_bundles(cfg))
    phases = []
    if command == "compare" and cfg.bank.before_compare:
        phases.append(Phase("compare: bank build pool", pool_bundles(cfg, cfg.bank.actors)))
    phases.append(Phase(f"{command}: {concurrent} concurrent trials at their largest step", trial * concurrent))
    return phases


def check_phases(phases: list[Phase], *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Reserve each phase's bundles on the connected Ray cluster as one placement group (PACK:
    any node, as Ray places the actors themselves), wait up to ``timeout_s``, free it again.
    Returns one row per phase: name, GPUs, CPUs, whether it fit, seconds."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    rows = []
    for ph in phases:
        row: dict[str, Any] = {"phase": ph.name, "gpus": ph.gpus, "cpus": ph.cpus, "bundles": len(ph.bundles)}
        t0 = time.perf_counter()
        if not ph.bundles:
            row.update(fits=True, seconds=0.0, note="runs in the driver")
            rows.append(row)
            continue
        pg = placement_group(list(ph.bundles), strategy="PACK")
        try:
            ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
            row["fits"] = bool(ready)
        finally:
            remove_placement_group(pg)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def describe(rows: list[dict[str, Any]], cluster: dict[str, float]) -> str:
    """The check's table, one line per phase."""
    head = f"cluster: {cluster.get('GPU', 0):g} GPUs, {cluster.get('CPU', 0):g} CPUs"
    lines = [head]
    for r in rows:
        verdict = "fits" if r["fits"] else "STAYS PENDING"
        lines.append(f"  {verdict:14s} {r['phase']}: {r['bundles']} bundles, {r['gpus']:g} GPUs, {r['cpus']:g} CPUs")
    return "\n".join(lines)
