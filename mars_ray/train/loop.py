"""Bradley-Terry reward-model training on Ray Train (DDP over gloo/nccl, or DeepSpeed ZeRO).

:func:`train_loop_per_worker` receives everything in one plain dict (no globals), so it runs the
same in-process (``train.num_workers=0``), on Ray Train workers, and after a restart
(``FailureConfig``): it resumes from ``ray.train.get_checkpoint()`` (completed passes are skipped).

Per pass the training pairs are shuffled (seed, epoch, pass) identically on every worker and dealt
out by rank (every rank gets the same number of pairs, wrapping around, so collective steps line
up). A micro-batch of ``train.batch_size`` pairs is one forward over its 2·B sequences
(chosen rows first), then the BT loss with optional per-pair weights / margins.

After every pass rank 0 reports a checkpoint::

    <checkpoint>/model/         plain HF folder (LoRA merged), loads with
                                AutoModelForSequenceClassification.from_pretrained
    <checkpoint>/model/         + the tokenizer
    <checkpoint>/train_state.pt trainable parameters, optimizer state, RNG states, progress

The last report also carries validation metrics (:func:`mars_ray.core.losses.pair_metrics`,
``val_loss``, ``val_tokens_per_s``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.config import Config
from mars_ray.core import chaos
from mars_ray.core import schema as S
from mars_ray.core.jsonable import plain as plain_values
from mars_ray.core.lengths import length_grouped_batches

__all__ = [
    "MODEL_SUBDIR",
    "TRAIN_STATE",
    "fit_reward_model",
    "lora_target_modules",
    "train_loop_per_worker",
    "wrap_lora",
]

MODEL_SUBDIR = "model"
TRAIN_STATE = "train_state.pt"
DS_SUBDIR = "deepspeed"  # the DeepSpeed engine's own checkpoint (every rank's shards) under tag DS_TAG
DS_TAG = "state"
SCORES_FILE = "scores.parquet"  # the trained model's rewards of score_path (the next epoch's margins)

# LoRA targets per architecture (config.model_type); anything else falls back to peft's table.
_LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
}
_HEAD_NAMES = ("classifier", "score")


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------


def lora_target_modules(model: Any) -> list[str]:
    """LoRA target module names for ``model``'s architecture.

    Raises:
        ValueError: an architecture we have no targets for (use full fine-tuning: train.lora=false).
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type in _LORA_TARGETS:
        return list(_LORA_TARGETS[model_type])
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:  # pragma: no cover - older peft
        table = {}
    if model_type in table:
        return list(table[model_type])
    raise ValueError(
        f"no LoRA target modules known for model_type={model_type!r}; set train.lora=false "
        "(full fine-tuning) or use a BERT/RoBERTa/DeBERTa/Llama-style backbone"
    )


def _head_names(model: Any) -> list[str]:
    names = [n for n in _HEAD_NAMES if hasattr(model, n)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")
    return names


def wrap_lora(model: Any, *, r: int, alpha: int, dropout: float) -> Any:
    """``peft`` LoRA on the attention query/value projections; the score head is trained in full
    (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        task_type="SEQ_CLS",
        r=int(r),
        lora_alpha=int(alpha),
        lora_dropout=float(dropout),
        target_modules=lora_target_modules(model),
        modules_to_save=_head_names(model),
    )
    return get_peft_model(model, cfg)


def _plain_model(model: Any, fp32_state: dict[str, Any] | None = None) -> Any:
    """A copy of ``model`` as a plain transformers model (LoRA merged); ``model`` is untouched.
    ``fp32_state``: master weights by parameter name (DeepSpeed bf16 keeps them in its optimizer,
    the module holds bf16 copies): the copy is made fp32 and takes them before merging."""
    import torch

    m = copy.deepcopy(model)
    if fp32_state is not None:
        m.float()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name in fp32_state:
                    p.copy_(fp32_state[name])
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    return m


def _master_weights(engine: Any, model: Any, rank: int) -> dict[str, Any] | None:
    """The fp32 master copy of every trainable parameter of a DeepSpeed bf16 engine (collective:
    every rank takes part, rank 0 gets the tensors); None when the engine is not in bf16."""
    if engine is None or not engine.bfloat16_enabled():
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            if rank == 0 and full is not None:
                out[name] = full.detach().float().cpu()
    return out if rank == 0 else None


def _trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    import torch

    # numpy's state as plain values (no pickled ndarray), so the checkpoint loads with weights_only
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def load_train_state(path: Path) -> dict[str, Any]:
    """A checkpoint's training state, unpickled with ``weights_only`` (tensors and plain values
    only: a checkpoint on shared storage cannot run code when it is read).

    Raises:
        ValueError: the file holds anything else (e.g. written by a mars_ray before this check).
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: the checkpoint holds objects other than tensors and plain values, so it is not "
            f"loaded (weights_only; {str(exc).splitlines()[0]}). A checkpoint written by an older "
            "mars_ray cannot be resumed: start the run again"
        ) from exc


# --------------------------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------------------------


def _read_pairs(path: str, extra: list[str]) -> dict[str, list]:
    import pyarrow.parquet as pq

    cols = [S.PROMPT, S.CHOSEN, S.REJECTED, *[c for c in extra if c]]
    names = pq.read_schema(path).names
    missing = [c for c in cols if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file must have PAIR_SCHEMA rows")
    return pq.read_table(path, columns=cols).to_pydict()


def _column_floats(
    data: dict[str, list], column: str | None, what: str, path: str, missing: float | None = None
) -> np.ndarray | None:
    if not column:
        return None
    vals = data[column]
    if missing is not None:
        if all(v is None for v in vals):
            raise ValueError(f"{path}: no pair has a value in column {column!r} ({what}); the data carries no margins")
        vals = [missing if v is None else v for v in vals]
    if any(v is None for v in vals):
        raise ValueError(f"{path}: column {column!r} ({what}) has missing values; fill them (e.g. 1.0)")
    arr = np.asarray(vals, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: column {column!r} ({what}) has non-finite values")
    return arr


def data_hash(train: dict[str, list], *arrays: np.ndarray | None) -> str:
    """sha256 of the training pairs in order (prompt, chosen, rejected) and their loss weights /
    label margins: a checkpoint records it, and resuming on other data is refused."""
    import hashlib

    h = hashlib.sha256()
    for cols in zip(train[S.PROMPT], train[S.CHOSEN], train[S.REJECTED]):
        for text in cols:
            b = str(text).encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    for a in arrays:
        h.update(b"-" if a is None else np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's share of ``order``; every rank gets ceil(n/world) items (wrapping around)."""
    n = len(order)
    per = math.ceil(n / world) if n else 0
    idx = (np.arange(per) * world + rank) % max(n, 1)
    return order[idx] if n else order


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> dict:
    """Train one reward model; all inputs in ``config``:

    ``config`` (``Config.to_dict()``), ``init_model`` (model ref or a previous model dir),
    ``train_path`` / ``val_path`` (parquet, PAIR_SCHEMA columns), optional ``weights_column`` and
    ``margin_column`` (used when ``train.margin_term``), ``epoch`` (MARS epoch, seeds the shuffle),
    ``local`` (True when running in-process: keep the caller's thread settings).

    Returns the final metrics (also reported through ``ray.train.report``).
    """
    import ray.train
    import torch

    chaos.adopt(config.get("chaos"))  # the driver's fault-injection rules, on any cluster

    from mars_ray.core.losses import bt_loss, center_penalty, normalise_weights, pair_metrics
    from mars_ray.models.precision import resolve_precision
    from mars_ray.models.reward import disable_dropout, encode_preferences, load_reward_model, pad_batch, score_pairs

    cfg = Config.from_dict(config["config"])
    t, dsc = cfg.train, cfg.deepspeed
    epoch = int(config.get("epoch", 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.get("local"):
        torch.set_num_threads(int(config.get("threads") or t.threads or max(1, round(t.cpus_per_worker or 1))))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

    # ---- model: fp32 weights (the master copy); bf16 is a compute precision (autocast or DeepSpeed)
    device = "cuda" if (t.use_gpu and torch.cuda.is_available()) else "cpu"
    precision = resolve_precision(t.precision, device)
    model, tokenizer = load_reward_model(
        config["init_model"],
        seed=cfg.seed,
        dtype="float32",
        device=device,  # the worker's GPU (Ray Train reserved it: train.use_gpu), else the CPU
        cache_dir=cfg.model.cache_dir,
        offline=cfg.model.offline,
        new_head=True,  # training from a backbone starts its head on purpose (the pipeline says so)
    )
    if t.disable_dropout:
        disable_dropout(model)
    torch.manual_seed(cfg.seed + 7919 * epoch)  # LoRA init + dropout: identical on every rank
    if t.lora:
        model = wrap_lora(model, r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout)
    model.train()

    # ---- resume
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / TRAIN_STATE).exists():
                state = load_train_state(Path(d) / TRAIN_STATE)
    resume_ckpt = ckpt if state is not None else None
    if state is not None:
        missing = set(state["trainable"]) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint does not match the model (unknown parameters {sorted(missing)[:3]})")
        model.load_state_dict(state["trainable"], strict=False)

    # ---- data
    # train.margin_term reads the pairs' label margins (the schema's margin column unless told otherwise)
    extra = [config.get("weights_column"), (config.get("margin_column") or S.MARGIN) if t.margin_term else None]
    train = _read_pairs(config["train_path"], [c for c in extra if c])
    val = _read_pairs(config["val_path"], []) if config.get("val_path") else None
    test = _read_pairs(config["test_path"], []) if config.get("test_path") else None
    to_score = _read_pairs(config["score_path"], [S.PAIR_ID]) if config.get("score_path") else None
    n_train = len(train[S.PROMPT])
    if n_train == 0:
        raise ValueError(f"{config['train_path']}: no training pairs")
    weights = _column_floats(train, config.get("weights_column"), "weights", config["train_path"])
    if weights is not None:  # mean 1 over the training set: a pair's weight is the same in any batch
        try:
            weights = normalise_weights(weights)
        except ValueError as e:
            raise ValueError(f"{config['train_path']}: column {config['weights_column']!r}: {e}") from None
    margins = _column_floats(train, extra[1], "label margins, train.margin_term", config["train_path"], missing=0.0)
    digest = data_hash(train, weights, margins)
    if state is not None and state.get("data_hash") not in (None, digest):
        raise ValueError(
            f"{config['train_path']}: the checkpoint to resume from was trained on other data (data hash "
            f"{state['data_hash']}, this data {digest}); refusing to resume. Restore the data it was trained "
            f"on, or delete that run's checkpoints (ray_train/{config.get('name') or '<name>'}) to start over"
        )
    lim = dict(max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens)
    enc_c, enc_r = encode_preferences(tokenizer, train[S.PROMPT], train[S.CHOSEN], train[S.REJECTED], **lim)
    has_types = enc_c.token_type_ids is not None
    pair_len = np.maximum(enc_c.lengths, enc_r.lengths)  # a pair's padded width in its batch

    # ---- distributed wrapping + optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if dsc.enabled:
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from mars_ray.train.deepspeed_config import build_ds_config

        ds_config = build_ds_config(dsc, t, world_size=world, bf16=precision.bf16)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        fwd = engine
        if resume_ckpt is not None:
            with resume_ckpt.as_directory() as d:
                if not (Path(d) / DS_SUBDIR).is_dir():
                    raise ValueError(
                        f"the checkpoint to resume from ({d}) has no DeepSpeed state ({DS_SUBDIR}/): it was "
                        "written without deepspeed.enabled; resume it with the same settings, or start over"
                    )
                # every rank loads its own partition of the optimizer (and, ZeRO-3, of the parameters)
                engine.load_checkpoint(str(Path(d) / DS_SUBDIR), tag=DS_TAG, load_lr_scheduler_states=False)
    else:
        model.to(device)
        # The fused kernel: one pass over the parameters (clip + step 32 ms vs 87 ms for MiniLM here).
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=device in ("cpu", "cuda"))
        if distributed and world > 1:
            fwd = ray.train.torch.prepare_model(model, move_to_device=False)
        else:
            fwd = model
        engine = None
    if state is not None and state.get("optimizer") is not None and engine is None:
        optimizer.load_state_dict(state["optimizer"])
    if state is not None:
        _set_rng_state(state["rng"])

    # bf16 autocast around the forward passes (fp32 master weights and optimizer state); DeepSpeed
    # runs bf16 itself (its engine holds bf16 weights and the fp32 master copy).
    amp = precision.autocast if engine is None else contextlib.nullcontext
    per_rank = math.ceil(n_train / world)
    micro_per_pass = math.ceil(per_rank / t.batch_size)
    steps_per_pass = math.ceil(micro_per_pass / t.grad_accum)
    total_steps = steps_per_pass * t.passes
    if dsc.enabled:  # DeepSpeed accumulates across pass ends: whole groups of grad_accum micro-batches
        total_steps = (micro_per_pass * t.passes) // t.grad_accum
    if t.max_steps is not None:
        total_steps = min(total_steps, int(t.max_steps))
    warmup = int(round(t.warmup_ratio * total_steps))

    def lr_at(step: int) -> float:
        return t.lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)

    passes_done = int(state["passes_done"]) if state else 0
    step = int(state["step"]) if state else 0
    resumed_from = step if state is not None else None
    # micro-batches of pass `passes_done` already trained (a checkpoint inside a pass)
    position = int(state.get("pass_position", 0)) if state else 0
    ckpt_every = int(t.checkpoint_steps) if t.checkpoint_steps else 0
    losses: list[float] = list(state.get("losses", [])) if state else []
    step_times: list[float] = []
    train_tokens = 0
    metrics: dict[str, Any] = {}
    ckpt_model = engine.module if engine is not None else model  # the module under DDP / DeepSpeed
    pending: list[Any] = []  # per-step losses still on the device

    def read_losses() -> None:
        """Move the pending per-step losses to ``losses`` in one host copy; the wait for the
        device (a GPU runs behind the host) lands in the last step's time, so a pass's step times
        still add up to its compute."""
        if pending:
            t_wait = time.perf_counter()
            losses.extend(torch.stack(pending).double().cpu().tolist())
            pending.clear()
            if step_times:
                step_times[-1] += time.perf_counter() - t_wait

    local = bool(config.get("local", False))
    prev_local: Path | None = None

    def checkpoint(report_metrics: dict, passes: int, *, position: int = 0, scores: dict | None = None) -> None:
        """Report ``report_metrics`` with a checkpoint at the current step (``position``: micro-batches
        of pass ``passes`` done, inside a pass); an in-process run drops the one it supersedes."""
        nonlocal prev_local
        d = _report(
            report_metrics,
            ckpt_model,
            tokenizer,
            optimizer if engine is None else None,
            losses,
            passes,
            step,
            rank,
            local,
            dsc.stage if dsc.enabled else None,
            scores=scores,
            data_digest=digest,
            pass_position=position,
            engine=engine,
        )
        if rank == 0:
            chaos.point(f"train.checkpoint.epoch{epoch}")
        if local and prev_local is not None:
            shutil.rmtree(prev_local, ignore_errors=True)  # superseded in-process checkpoint
        prev_local = d

    if state is not None and (passes_done >= t.passes or step >= total_steps):
        # Restarted after the last checkpoint was written: report it again and stop.
        metrics = dict(state.get("metrics") or {})
        checkpoint(metrics, passes_done)
        return metrics
    evaluate = (bt_loss, pair_metrics, score_pairs)
    # The model as loaded, on the test pairs: the "before" of a run (a fresh start only).
    before = {}
    if test is not None and config.get("test_before") and state is None:
        with amp():  # held-out scoring in the training precision, as inference is (bf16 where native)
            before = _validate(
                ckpt_model, tokenizer, test, lim, cfg, rank, world, distributed, *evaluate, prefix="base_test"
            )
    for p in range(passes_done, t.passes):
        if step >= total_steps:
            break
        rng = np.random.default_rng([cfg.seed, epoch, p])
        mine = _shard(rng.permutation(n_train), rank, world)
        micro = length_grouped_batches(mine, pair_len, t.batch_size, rng, group=t.length_group)
        acc_loss, n_acc, t0 = None, 0, time.perf_counter()
        skip = position if p == passes_done else 0  # the same batch order, from the checkpoint's place
        for k, idx in enumerate(micro):
            if k < skip:
                continue
            if step >= total_steps:
                break
            _maybe_fail(config.get("fault"), step, rank, epoch)
            ids = [enc_c.input_ids[i] for i in idx] + [enc_r.input_ids[i] for i in idx]
            tts = (
                ([enc_c.token_type_ids[i] for i in idx] + [enc_r.token_type_ids[i] for i in idx]) if has_types else None
            )
            batch = pad_batch(ids, tts, tokenizer.pad_token_id)
            train_tokens += int(batch["attention_mask"].sum())
            batch = {key: v.to(device) for key, v in batch.items()}
            with amp():
                rewards = fwd(**batch).logits[:, 0].float()
            b = len(idx)
            w = torch.from_numpy(weights[idx]).to(device) if weights is not None else None
            m = torch.from_numpy(margins[idx]).to(device) if margins is not None else None
            loss = bt_loss(rewards[:b], rewards[b:], weights=w, margin=m)
            if t.center_rewards:
                loss = loss + t.center_rewards * center_penalty(rewards[:b], rewards[b:])
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            if engine is not None:
                engine.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
                before_step = engine.global_steps
                engine.step()
                # DeepSpeed steps every grad_accum micro-batches by its own count, across passes: a
                # step is counted only when it took one (not at a pass end mid-accumulation)
                took = engine.global_steps > before_step
            else:
                (loss / t.grad_accum).backward()
                took = (k + 1) % t.grad_accum == 0 or k + 1 == len(micro)
            # on the device: no host copy (and no wait for a GPU) per step; read at the pass end
            acc_loss = loss.detach() if acc_loss is None else acc_loss + loss.detach()
            n_acc += 1
            boundary = took
            if boundary:
                if engine is None:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                pending.append(acc_loss / n_acc)
                step_times.append(time.perf_counter() - t0)
                step += 1
                acc_loss, n_acc, t0 = None, 0, time.perf_counter()
                if ckpt_every and step % ckpt_every == 0 and k + 1 < len(micro) and step < total_steps:
                    read_losses()
                    mid = _pass_metrics(losses, step_times, train_tokens, step, p, epoch, world, distributed)
                    checkpoint(mid, p, position=k + 1)
        passes_done = p + 1
        last = passes_done >= t.passes or step >= total_steps
        read_losses()
        metrics = _pass_metrics(losses, step_times, train_tokens, step, passes_done, epoch, world, distributed)
        metrics.update(precision=precision.compute, precision_reason=precision.reason)
        if last and val is not None:
            with amp():
                metrics.update(_validate(ckpt_model, tokenizer, val, lim, cfg, rank, world, distributed, *evaluate))
        if last and test is not None:
            with amp():
                metrics.update(
                    _validate(ckpt_model, tokenizer, test, lim, cfg, rank, world, distributed, *evaluate, prefix="test")
                )
        metrics.update(before)
        if engine is not None:
            metrics["deepspeed_global_steps"] = int(engine.global_steps)
        if resumed_from is not None:
            metrics["resumed_from_step"] = resumed_from
        scores = None
        if last and to_score is not None:
            with amp():
                rc, rr = _score_sharded(
                    ckpt_model, tokenizer, to_score, lim, cfg, rank, world, distributed, score_pairs
                )
            scores = {S.PAIR_ID: to_score[S.PAIR_ID], "reward_chosen": rc, "reward_rejected": rr, "margin": rc - rr}
        checkpoint(metrics, passes_done, scores=scores)
        if last:
            break
    return metrics


def _maybe_fail(fault: dict | None, step: int, rank: int, epoch: int) -> None:
    """Injected worker failure for recovery tests (see ``fit_reward_model(_fault=...)``); an
    ``"epoch"`` key limits it to that MARS epoch's training run."""
    if not fault or rank != 0 or step != int(fault["at_step"]):
        return
    if fault.get("epoch") is not None and int(fault["epoch"]) != epoch:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"failed at step {step}\n", encoding="utf-8")
    raise RuntimeError(f"injected worker fault at step {step} (recovery test)")


def _pass_metrics(losses, step_times, train_tokens, step, passes_done, epoch, world, distributed) -> dict:
    import torch

    hist = torch.tensor(losses, dtype=torch.float64)
    if distributed and world > 1 and len(hist):
        torch.distributed.all_reduce(hist)
        hist /= world
    hist_l = [float(x) for x in hist]
    st = float(np.mean(step_times)) if step_times else float("nan")
    total_t = float(np.sum(step_times)) if step_times else 0.0
    return {
        "epoch": epoch,
        "passes_done": passes_done,
        "steps": step,
        "train_loss": float(np.mean(hist_l[-max(1, len(step_times)) :])) if hist_l else float("nan"),
        "train_loss_first": hist_l[0] if hist_l else float("nan"),
        "train_loss_last": hist_l[-1] if hist_l else float("nan"),
        "train_loss_history": hist_l,
        "step_time_s": st,
        "train_tokens_per_s": (train_tokens / total_t) if total_t > 0 else float("nan"),
        "world_size": world,
    }


def _validate(
    model, tokenizer, val, lim, cfg, rank, world, distributed, bt_loss, pair_metrics, score_pairs, prefix: str = "val"
) -> dict:
    """Held-out metrics (validation, or test under ``prefix``) from :func:`_score_sharded`."""
    import torch

    n = len(val[S.PROMPT])
    t0 = time.perf_counter()
    rc, rr, tokens = _score_sharded(
        model, tokenizer, val, lim, cfg, rank, world, distributed, score_pairs, with_tokens=True
    )
    elapsed = time.perf_counter() - t0
    out = {f"{prefix}_{k}": v for k, v in pair_metrics(rc, rr).items()}
    out[f"{prefix}_loss"] = float(bt_loss(torch.from_numpy(rc), torch.from_numpy(rr))) if n else float("nan")
    out[f"{prefix}_tokens_per_s"] = tokens / elapsed if elapsed > 0 else float("nan")
    return out


def _score_sharded(model, tokenizer, val, lim, cfg, rank, world, distributed, score_pairs, with_tokens=False):
    """Rewards of every pair of ``val``, sharded by rank (equal-size shards), gathered to every rank:
    ``(r_chosen, r_rejected)`` in input order (and the token count with ``with_tokens``)."""
    import torch

    from mars_ray.models.reward import encode_preferences, score_encoded_pairs

    n = len(val[S.PROMPT])
    mine = _shard(np.arange(n), rank, world) if n else np.arange(0)
    was_training = model.training
    model.eval()
    # tokenised once: the same encodings are scored and counted
    ec, er = encode_preferences(
        tokenizer,
        [val[S.PROMPT][i] for i in mine],
        [val[S.CHOSEN][i] for i in mine],
        [val[S.REJECTED][i] for i in mine],
        **lim,
    )
    rc, rr = score_encoded_pairs(model, tokenizer, ec, er, batch_size=2 * cfg.train.batch_size)
    if was_training:
        model.train()
    tokens = int(ec.lengths.sum() + er.lengths.sum())
    if distributed and world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, (mine, rc, rr, tokens))
        full_c = np.empty(n, dtype=np.float32)
        full_r = np.empty(n, dtype=np.float32)
        for idx, c, r, _ in parts:
            full_c[idx], full_r[idx] = c, r
        tokens = sum(x[3] for x in parts)
        rc, rr = full_c, full_r
    return (rc, rr, tokens) if with_tokens else (rc, rr)


def _report(
    metrics,
    model,
    tokenizer,
    optimizer,
    losses,
    passes_done,
    step,
    rank,
    local,
    ds_stage,
    scores=None,
    data_digest: str | None = None,
    pass_position: int = 0,
    engine: Any = None,
) -> Path | None:
    """Rank 0 writes and reports the checkpoint (others report metrics only); returns the local
    directory when it still exists (in-process runs), else None. ``scores`` (columns) goes into the
    checkpoint as :data:`SCORES_FILE`."""
    import ray.train
    import torch

    master = _master_weights(engine, model, rank)  # DeepSpeed bf16: save the fp32 masters, not bf16 copies
    if ds_stage == 3:  # parameters are partitioned: gather them (collective) before saving
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            plain = _plain_model(model, master) if rank == 0 else None
            trainable = _trainable_state(model) if rank == 0 else None
    else:
        plain = _plain_model(model, master) if rank == 0 else None
        trainable = _trainable_state(model) if rank == 0 else None
    d = Path(tempfile.mkdtemp(prefix="mars_ray_ckpt_"))
    if engine is not None:
        # The engine's full state (module, optimizer partitions, step counters): collective, every
        # rank writes its own shard files; Ray Train merges the ranks' directories into one checkpoint.
        engine.save_checkpoint(str(d / DS_SUBDIR), tag=DS_TAG, save_latest=False)
    if rank != 0:
        if engine is None:
            shutil.rmtree(d, ignore_errors=True)
            ray.train.report(metrics, checkpoint=None)
            return None
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        if not local:
            shutil.rmtree(d, ignore_errors=True)
        return None
    # In-process runs hand the directory itself back as the checkpoint: it must outlive this call.
    plain.save_pretrained(d / MODEL_SUBDIR)
    tokenizer.save_pretrained(d / MODEL_SUBDIR)
    if scores is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mars_ray.core.atomic import atomic_path

        with atomic_path(d / SCORES_FILE) as tmp:
            pq.write_table(pa.table(scores), tmp)
    torch.save(
        {
            "trainable": trainable,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": _rng_state(),
            "passes_done": passes_done,
            "step": step,
            "pass_position": int(pass_position),  # micro-batches of pass `passes_done` done (mid-pass)
            "data_hash": data_digest,
            # the history averaged over workers (what was reported), identical on every rank;
            # plain Python values (no numpy scalars), so the file loads with weights_only
            "losses": plain_values(list(metrics.get("train_loss_history", losses))),
            "metrics": plain_values(metrics),
        },
        d / TRAIN_STATE,
    )
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
    if not local:
        shutil.rmtree(d, ignore_errors=True)  # uploaded synchronously to storage_path
        return None
    return d


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def fit_reward_model(
    cfg: Config,
    *,
    init_model: str,
    train_path: str | os.PathLike,
    val_path: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    name: str,
    test_path: str | os.PathLike | None = None,
    test_before: bool = False,
    score_path: str | os.PathLike | None = None,
    weights_column: str | None = None,
    margin_column: str | None = None,
    epoch: int = 1,
    max_failures: int = 0,
    _fault: dict | None = None,
) -> dict:
    """Train a reward model with Ray Train; returns the final metrics plus ``model_dir`` (a plain
    HF folder, LoRA merged) and ``checkpoint_dir``.

    ``test_path``: also score these pairs with the final model (``test_*`` metrics, as
    ``mars_ray.pipeline`` computes them; it saves a scoring pool per epoch); ``test_before``: and
    with the model as loaded, before any step (``base_test_*``; a fresh start only).
    ``score_path``: the trained model's rewards of these pairs go into the checkpoint
    (``scores_path`` in the result: pair_id, reward_chosen, reward_rejected, margin), the next MARS
    epoch's margins without another model load.

    ``train.num_workers=0`` runs the loop in this process (no workers; tests). Re-running with the
    same ``run_dir`` / ``name`` resumes from the latest checkpoint (Ray Train's behaviour).
    ``max_failures``: worker-group restarts (from the last checkpoint) before giving up.
    ``_fault`` (recovery tests only): ``{"marker": path, "at_step": k}`` makes rank 0 raise once,
    before optimizer step ``k``, if ``marker`` does not exist yet (it is created first); with
    ``"epoch": t`` only in MARS epoch t's training run.

    Raises:
        ValueError: invalid configuration (checked before anything starts).
        ray.train.WorkerGroupError / RuntimeError: training failed (after ``max_failures`` retries).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    t = cfg.train
    if cfg.deepspeed.enabled:
        from mars_ray.train.deepspeed_config import build_ds_config

        build_ds_config(cfg.deepspeed, t, world_size=max(1, t.num_workers))  # fail fast, on the driver
    local = t.num_workers == 0
    threads = None
    if not local:  # decided once, on the driver, for every worker
        from mars_ray.runtime import auto_cpus, init_ray

        init_ray(cfg.resources)
        threads = t.threads or max(1, round(auto_cpus(t.cpus_per_worker, t.num_workers)))
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    loop_config = {
        "config": cfg.to_dict(),
        "init_model": str(init_model),
        "train_path": str(Path(train_path).resolve()),
        "val_path": str(Path(val_path).resolve()) if val_path else None,
        "test_path": str(Path(test_path).resolve()) if test_path else None,
        "test_before": bool(test_before),
        "score_path": str(Path(score_path).resolve()) if score_path else None,
        "weights_column": weights_column,
        "margin_column": margin_column,
        "epoch": int(epoch),
        "local": local,
        "fault": _fault,
        "chaos": chaos.settings(),
        "name": name,
        "threads": threads,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=None
            if local
            else {"CPU": t.cpus_per_worker if t.cpus_per_worker is not None else 1.0},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} reported no checkpoint")
    ckpt_dir = Path(result.checkpoint.path)
    if local:  # move the in-process checkpoint next to the Ray runs
        from mars_ray.core.atomic import move_dir

        try:
            ckpt_dir = move_dir(ckpt_dir, run_dir / name / "checkpoint_local")
        except OSError:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a temporary checkpoint no one resumes from
            raise
    metrics = dict(result.metrics or {})
    metrics["checkpoint_dir"] = str(ckpt_dir)
    metrics["model_dir"] = str(ckpt_dir / MODEL_SUBDIR)
    if score_path and (ckpt_dir / SCORES_FILE).exists():
        metrics["scores_path"] = str(ckpt_dir / SCORES_FILE)
    if local:
        from mars_ray.runtime import release_memory

        del trainer, result
        release_memory()  # the model and optimizer this process trained are garbage now
    return metrics
