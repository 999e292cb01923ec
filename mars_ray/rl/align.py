"""`mars-ray align`: policy optimisation of a causal LM against the reward model served by Ray Serve.

The algorithm is TRL's (``rl.algorithm``: ``GRPOTrainer`` or ``RLOOTrainer``: PPO's clipped
probability ratio, ``epsilon = rl.clip``, and a KL penalty to the reference policy,
``beta = rl.kl_coef``; with LoRA the reference is the base model with the adapter switched off).
This module only wires it up:

- the driver reads prompts with the data layer, deploys (or finds) the reward model on Ray Serve,
  and runs a Ray Train ``TorchTrainer`` (``rl.num_workers`` workers, DDP with gloo on CPU / NCCL on
  GPU), so rollouts and updates scale across GPUs and nodes;
- every worker builds the TRL trainer; its reward function is :class:`~mars_ray.rl.rewards.ServedReward`,
  which calls the Serve deployment through its ``DeploymentHandle`` (or HTTP);
- a checkpoint every ``rl.save_steps`` steps goes to Ray Train (``RayTrainReportCallback``); a
  worker that dies is restarted from it (``rl.max_failures``) and ``--resume DIR`` continues a run
  whose driver was killed;
- rollout generation, reward calls and the update are timed separately, every step, into
  ``metrics.jsonl`` beside TRL's own metrics (reward, KL, loss, completion length, clip ratios).

Outputs in ``output.dir``: ``config.yaml``, ``prompts.jsonl``, ``metrics.jsonl``, ``policy_adapter/``
(the LoRA adapter), ``policy/`` (the merged policy: a plain Hugging Face folder), ``align_summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mars_ray.config import Config
from mars_ray.core import atomic

PROMPTS_FILE = "prompts.jsonl"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "align_summary.json"
POLICY_DIR = "policy"
ADAPTER_DIR = "policy_adapter"
RUN_NAME = "policy"


class AlignDirError(ValueError):
    """The output directory cannot be used as asked."""


# ------------------------------------------------------------------------------ prompts


def fit_messages(
    messages: list[dict[str, str]],
    count: Callable[[list[dict[str, str]]], int],
    max_tokens: int,
    drop: Callable[[str, int], str],
) -> list[dict[str, str]]:
    """Keep a conversation within ``max_tokens``: drop its oldest turns (what is left starts with a
    user turn), then cut the first remaining turn from the left. ``count`` measures rendered
    messages in tokens; ``drop(text, n)`` removes the first ``n`` tokens of a text."""
    msgs = [dict(m) for m in messages]
    while len(msgs) > 1 and count(msgs) > max_tokens:
        msgs = msgs[1:]
        while len(msgs) > 1 and msgs[0]["role"] != "user":
            msgs = msgs[1:]
    over = count(msgs) - max_tokens
    if over > 0:
        msgs[0]["content"] = drop(msgs[0]["content"], over)
    return msgs


def prompt_rows(
    cfg: Config, *, split: str, limit: int | None, tokenizer: Any, max_tokens: int, path: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Distinct prompts of ``split`` (``train``, ``val`` or ``test``; the first ``limit``, in the
    data layer's deterministic order) as ``{"prompt": chat messages, "rm_prompt": text}`` rows,
    each conversation fitted into ``max_tokens`` of the policy's chat template. Falls back to the
    other splits, in order, when ``split`` is empty (tiny data); the info dict says what was used."""
    import dataclasses

    from mars_ray.core import schema as S
    from mars_ray.core.judging import to_messages
    from mars_ray.data import read_preferences

    data_cfg = dataclasses.replace(cfg.data, path=path) if path else cfg.data
    loaded = read_preferences(data_cfg, seed=cfg.seed)
    t = loaded.table
    prompts, splits = t.column(S.PROMPT).to_pylist(), t.column(S.SPLIT).to_pylist()
    order = [split] + [s for s in ("test", "val", "train") if s != split]
    used = next((s for s in order if s in splits), None)
    if used is None:
        raise ValueError(f"{data_cfg.path}: no usable pairs, so no prompts")
    seen: dict[str, None] = {}
    for p, s in zip(prompts, splits):
        if s == used and p not in seen:
            seen[p] = None
    chosen = list(seen)[: limit if limit is not None else None]

    def count(msgs: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))

    def drop(text: str, n: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[min(len(ids) - 1, n + 1) :]) if ids else text  # +1: a split word

    rows, fitted = [], 0
    for p in chosen:
        msgs = to_messages(p)
        fit = fit_messages(msgs, count, max_tokens, drop)
        fitted += fit != msgs
        rows.append({"prompt": fit, "rm_prompt": p})
    info = {
        "data": data_cfg.path,
        "split": used,
        "asked_split": split,
        "prompts": len(rows),
        "distinct_in_split": len(seen),
        "fitted_to_length": fitted,
        "max_prompt_tokens": max_tokens,
    }
    return rows, info


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic.write_jsonl(path, rows)


def read_jsonl(path: Path, on_torn: Any = None) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (a crash mid-append) is dropped, not fatal."""
    return atomic.read_jsonl(path, on_torn=on_torn)


# ------------------------------------------------------------------------------ the worker


def _trl_classes(algorithm: str):
    if algorithm == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        return RLOOConfig, RLOOTrainer
    from trl import GRPOConfig, GRPOTrainer

    return GRPOConfig, GRPOTrainer


class _StepTimes:
    """Seconds per optimisation step, split into rollout generation, reward calls and the rest."""

    def __init__(self, reward: Any) -> None:
        self.reward = reward
        self.generate_s = 0.0
        self.generations = 0
        self._step_t0 = 0.0
        self._gen_mark = 0.0
        self._rew_mark = (0, 0, 0.0)
        self.last: dict[str, float] = {}

    def wrap_generate(self, trainer: Any) -> bool:
        inner = getattr(trainer, "_generate", None)
        if inner is None:
            return False

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.generate_s += time.perf_counter() - t0
                self.generations += 1

        trainer._generate = timed
        return True

    def begin(self) -> None:
        self._step_t0 = time.perf_counter()
        self._gen_mark = self.generate_s
        c = self.reward.counters
        self._rew_mark = (c.calls, c.items, c.seconds)

    def end(self) -> dict[str, float]:
        step = time.perf_counter() - self._step_t0
        c = self.reward.counters
        rollout = self.generate_s - self._gen_mark
        reward = c.seconds - self._rew_mark[2]
        self.last = {
            "time/step_s": step,
            "time/rollout_s": rollout,
            "time/reward_s": reward,
            "time/update_s": max(0.0, step - rollout - reward),
            "reward_calls": float(c.calls - self._rew_mark[0]),
            "reward_items": float(c.items - self._rew_mark[1]),
        }
        return self.last


def trl_args(r: Any, *, hf_dir: str, seed: int, use_gpu: bool, bf16: bool) -> dict[str, Any]:
    """TRL's ``GRPOConfig`` / ``RLOOConfig`` keyword arguments from ``cfg.rl``: PPO's clip
    (``epsilon``), the KL coefficient (``beta``), the group, the sampling, and the reward and
    advantage scaling of each algorithm (GRPO ``scale_rewards``; RLOO ``normalize_advantages``),
    vLLM rollouts when asked (``use_vllm``, ``vllm_mode``: GPU nodes with vLLM installed)."""
    args: dict[str, Any] = dict(
        output_dir=hf_dir,
        learning_rate=r.lr,
        beta=r.kl_coef,
        epsilon=r.clip,
        num_generations=r.num_generations,
        max_completion_length=r.max_new_tokens,
        temperature=r.temperature,
        per_device_train_batch_size=r.prompts_per_step * r.num_generations,
        max_steps=r.steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=r.save_steps,
        save_total_limit=2,
        use_cpu=not use_gpu,
        bf16=bf16,
        report_to=[],
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        use_vllm=bool(r.use_vllm),
    )
    if r.use_vllm:
        args["vllm_mode"] = r.vllm_mode
    if r.algorithm == "grpo":
        args["scale_rewards"] = r.scale_rewards
    else:
        args["normalize_advantages"] = bool(r.normalize_advantages)
    return args


def align_loop_per_worker(config: dict) -> None:
    """Ray Train per-worker loop: one TRL GRPO/RLOO run; everything arrives in ``config``."""
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import TrainerCallback

    cfg = Config.from_dict(config["config"], source="align worker")
    r = cfg.rl
    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    from datasets import Dataset
    from peft import LoraConfig

    from mars_ray.models.resolve import load_causal_lm

    ds = Dataset.from_list(read_jsonl(Path(config["prompts_path"])))
    from mars_ray.runtime import pick_device

    # the worker's GPU when rl.use_gpu (Ray Train reserved it; TRL keeps the model there), else the CPU
    device = pick_device() if bool(r.use_gpu) else "cpu"  # an error if a reserved GPU is unusable
    model, tokenizer = load_causal_lm(config["policy_path"], device=device)
    model.train()
    reward = config["reward"]
    ConfigCls, TrainerCls = _trl_classes(r.algorithm)
    use_gpu = device.startswith("cuda")
    from mars_ray.models.precision import native_bf16

    args = ConfigCls(
        **trl_args(r, hf_dir=config["hf_dir"], seed=cfg.seed, use_gpu=use_gpu, bf16=use_gpu and native_bf16("cuda")),
        disable_tqdm=rank != 0,
    )
    peft_config = None
    if r.lora:
        peft_config = LoraConfig(
            r=r.lora_r,
            lora_alpha=r.lora_alpha,
            lora_dropout=r.lora_dropout,
            target_modules=list(r.lora_target_modules),
            task_type="CAUSAL_LM",
        )
    times = _StepTimes(reward)
    metrics_path = Path(config["metrics_path"])

    class _Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.begin()

        def on_step_end(self, args, state, control, **kw):
            times.end()

        def on_log(self, args, state, control, logs=None, **kw):
            if rank != 0 or not logs or "train_runtime" in logs:
                return
            row = {
                "step": int(state.global_step),
                **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))},
                **times.last,
            }
            atomic.append_line(metrics_path, row)

    trainer = TrainerCls(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_Timing(), RayTrainReportCallback()],
    )
    timed = times.wrap_generate(trainer)
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume_dir = ckpt.to_directory()  # a local copy that outlives the call
        resume = os.path.join(resume_dir, RayTrainReportCallback.CHECKPOINT_NAME)
    t0 = time.perf_counter()
    done = _checkpoint_step(resume) >= r.steps if resume else False
    if done:
        # The run had finished its steps before it was stopped. transformers' loop checks
        # max_steps only after a step, so train() from this checkpoint would take one more
        # (at learning rate 0): load its weights and state instead.
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t0
    info: dict[str, Any] = {
        "train_s": train_s,
        "rollout_timed": timed,
        "resumed_from": resume,
        "world_size": ctx.get_world_size(),
        "global_step": int(trainer.state.global_step),
    }
    if rank == 0:
        out = Path(config["out_dir"])
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if r.lora:
            adapter = out / ADAPTER_DIR
            shutil.rmtree(adapter, ignore_errors=True)
            unwrapped.save_pretrained(adapter)
            info["lora_b_norm"] = float(
                sum(float(p.detach().float().norm() ** 2) for n, p in unwrapped.named_parameters() if "lora_B" in n)
                ** 0.5
            )
            merged = unwrapped.merge_and_unload()
        else:
            merged = unwrapped
        policy = out / POLICY_DIR
        tmp = out / (POLICY_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(policy, ignore_errors=True)
        os.replace(tmp, policy)
        atomic.write_json(out / "worker_info.json", info)
    ray.train.report({"done": 1.0, "global_step": float(trainer.state.global_step)})


def _checkpoint_step(checkpoint_dir: str) -> int:
    """The optimisation step a transformers checkpoint was written at (0 if it does not say)."""
    path = Path(checkpoint_dir) / "trainer_state.json"
    try:
        return int(json.loads(path.read_text()).get("global_step", 0))
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------------------ the driver


def _prepare_dir(cfg: Config, out: Path, resume: bool) -> None:
    if resume:
        if not (out / "config.yaml").exists() or not (out / PROMPTS_FILE).exists():
            raise AlignDirError(f"{out}: not a mars-ray align directory (no config.yaml + {PROMPTS_FILE}) to resume")
        return
    atomic.prepare_output_dir(
        out,
        overwrite=cfg.output.overwrite,
        owned=(
            PROMPTS_FILE,
            METRICS_FILE,
            SUMMARY_FILE,
            POLICY_DIR,
            ADAPTER_DIR,
            "ray_train",
            "hf",
            "worker_info.json",
            "config.yaml",
            "prompt_info.json",
        ),
        in_use=lambda d: AlignDirError(
            f"{d} is not empty; resume it with `mars-ray align --resume {d}`, choose another "
            "--output.dir, or pass --output.overwrite true to replace it"
        ),
    )


def deploy_reward(cfg: Config, log: Callable[[str], None] = print):
    """Where the policy's rewards come from (see ``rl.reward_*``); deploys the reward model on Ray
    Serve when asked. Returns ``(RewardTarget, deployed app name or None, description)``."""
    from mars_ray.rl.rewards import RewardTarget

    r = cfg.rl
    if r.reward_url:
        return RewardTarget(url=r.reward_url.rstrip("/"), token_env=r.reward_token_env), None, f"HTTP {r.reward_url}"
    from ray import serve

    from mars_ray.serve import app as serve_app

    app = cfg.serve.app_name
    deployed = None
    if r.reward_deploy:
        model = r.reward_model or cfg.model.reward
        t0 = time.perf_counter()
        serve_app.start(cfg, model=model)
        deployed = app
        log(f"align: reward model {model} deployed on Ray Serve as {app!r} in {time.perf_counter() - t0:.1f}s")
    elif app not in serve.status().applications:
        raise ValueError(
            f"rl.reward_deploy=false but no Serve application {app!r} runs on this cluster; "
            f"start one with `mars-ray serve --serve.app_name {app}` or set rl.reward_deploy=true"
        )
    if r.reward_transport == "http":
        token_env = cfg.serve.auth_token_env
        return (
            RewardTarget(url=serve_app.url_of(cfg.serve), token_env=token_env),
            deployed,
            f"HTTP {serve_app.url_of(cfg.serve)}",
        )
    return RewardTarget(app=app), deployed, f"Serve app {app!r} (DeploymentHandle)"


def serve_counters(app: str | None) -> dict[str, Any] | None:
    """The reward app's request counters (``/health``), or None when it is not a Serve app here."""
    if not app:
        return None
    try:
        from ray import serve

        return dict(serve.get_app_handle(app).health.remote().result(timeout_s=30)["counters"])
    except Exception:
        return None


def align(cfg: Config, *, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the policy stage into ``cfg.output.dir``; returns the summary.

    Raises:
        AlignDirError: the output directory is in use (and neither resume nor overwrite was asked).
        ValueError: bad configuration, data without prompts, or no reward model to call.
        ray.train.WorkerGroupError: training failed after ``rl.max_failures`` restarts.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mars_ray.models.resolve import load_tokenizer, resolve_model
    from mars_ray.rl.rewards import ServedReward
    from mars_ray.runtime import init_ray, torch_config

    cfg.validate()
    r = cfg.rl
    out = Path(cfg.output.dir).resolve()
    _prepare_dir(cfg, out, resume)
    t_start = time.perf_counter()
    policy = resolve_model(r.policy, cache_dir=cfg.model.cache_dir, offline=cfg.model.offline)
    if resume:
        rows = read_jsonl(out / PROMPTS_FILE)
        prompt_info = json.loads((out / "prompt_info.json").read_text())
    else:
        cfg.save(out)
        tok = load_tokenizer(policy)
        rows, prompt_info = prompt_rows(
            cfg, split="train", limit=r.num_prompts, tokenizer=tok, max_tokens=r.max_prompt_tokens
        )
        write_jsonl(out / PROMPTS_FILE, rows)
        atomic.write_json(out / "prompt_info.json", prompt_info)
    log(
        f"align: {r.algorithm} on {policy.model_id} with {len(rows)} prompts from {prompt_info['data']} "
        f"({prompt_info['split']} split), {r.steps} steps x {r.prompts_per_step} prompt(s) x {r.num_generations} "
        f"completions per worker, {r.num_workers} worker(s)"
    )
    init_ray(cfg.resources)
    import ray

    target, deployed, where = deploy_reward(cfg, log)
    reward = ServedReward(target)
    try:
        reward.score(["Is this reachable?"], ["Yes."])  # fail fast, before any worker starts
        log(f"align: rewards from {where}")
        before = serve_counters(target.app or deployed)
        # A worker reserves rl.cpus_per_worker (default 1, so a reward replica fits beside it on a
        # small machine) but runs torch on an even share of the cluster's cores: rollouts, reward
        # calls and updates take turns, so the replica is idle while the policy computes.
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        cpus = float(r.cpus_per_worker) if r.cpus_per_worker is not None else 1.0
        threads = (
            max(1, int(r.cpus_per_worker))
            if r.cpus_per_worker is not None
            else max(1, min(8, int(total_cpus // max(1, r.num_workers))))
        )
        metrics_path = out / METRICS_FILE
        loop_config = {
            "config": cfg.to_dict(),
            "prompts_path": str(out / PROMPTS_FILE),
            "policy_path": policy.path,
            "reward": reward,
            "hf_dir": str(out / "hf"),
            "out_dir": str(out),
            "metrics_path": str(metrics_path),
            "threads": threads,
        }
        trainer = TorchTrainer(
            align_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=torch_config(use_gpu=r.use_gpu, device=cfg.resources.device),
            scaling_config=ScalingConfig(
                num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": cpus}
            ),
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=str(out / "ray_train"),
                failure_config=FailureConfig(max_failures=r.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            raise result.error
        fit_s = time.perf_counter() - t0
        after = serve_counters(target.app or deployed)
        shutil.rmtree(out / "hf", ignore_errors=True)  # TRL's own copies; Ray Train keeps the checkpoints
    finally:
        if deployed:
            from mars_ray.serve import app as serve_app

            serve_app.stop(deployed)
    summary = _summarise(
        cfg, out, policy.model_id, prompt_info, where, before, after, fit_s, time.perf_counter() - t_start
    )
    atomic.write_json(out / SUMMARY_FILE, summary, default=float)
    f = summary["final"]
    log(
        f"align: {summary['steps']} steps, reward {f.get('reward')}, kl {f.get('kl')}; per step: rollout "
        f"{summary['time_per_step']['rollout_s']:.2f}s, reward {summary['time_per_step']['reward_s']:.2f}s, update "
        f"{summary['time_per_step']['update_s']:.2f}s; policy {summary['policy']}"
    )
    return summary


def _summarise(
    cfg: Config, out: Path, policy_id: str, prompt_info: dict, where: str, before, after, fit_s: float, total_s: float
) -> dict[str, Any]:
    import numpy as np

    torn: list[str] = []  # a crash mid-append leaves a torn last line: dropped and recorded
    rows = read_jsonl(out / METRICS_FILE, on_torn=torn.append) if (out / METRICS_FILE).exists() else []
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:  # a resumed run logs the steps after its checkpoint again: keep the last
        by_step[int(row["step"])] = row
    steps = [by_step[k] for k in sorted(by_step)]

    def med(key: str) -> float:
        vals = [s[key] for s in steps if key in s]
        return float(np.median(vals)) if vals else float("nan")

    info = json.loads((out / "worker_info.json").read_text()) if (out / "worker_info.json").exists() else {}
    served = None
    if before is not None and after is not None:
        served = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in ("requests", "pairs", "batches")}
    final = steps[-1] if steps else {}
    keys = ("reward", "reward_std", "kl", "loss", "completions/mean_length", "entropy", "clip_ratio/region_mean")
    return {
        "metrics_torn_lines": torn,
        "policy_base": policy_id,
        "algorithm": cfg.rl.algorithm,
        "steps": len(steps),
        "seed": cfg.seed,
        "kl_coef": cfg.rl.kl_coef,
        "clip": cfg.rl.clip,
        "lora": cfg.rl.lora,
        "num_workers": cfg.rl.num_workers,
        "reward_source": where,
        "reward_model": cfg.rl.reward_url or cfg.rl.reward_model or cfg.model.reward,
        "prompts": prompt_info,
        "final": {k: final.get(k) for k in keys if k in final},
        "first": {k: steps[0].get(k) for k in keys if steps and k in steps[0]},
        "time_per_step": {k: med(f"time/{k}") for k in ("step_s", "rollout_s", "reward_s", "update_s")},
        "reward_calls": int(sum(s.get("reward_calls", 0) for s in steps)),
        "reward_items": int(sum(s.get("reward_items", 0) for s in steps)),
        "served_counters_delta": served,
        "lora_b_norm": info.get("lora_b_norm"),
        "policy": str(out / POLICY_DIR),
        "adapter": str(out / ADAPTER_DIR) if cfg.rl.lora else None,
        "fit_s": round(fit_s, 2),
        "total_s": round(total_s, 2),
        "worker": info,
    }
