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

import copy
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.config import Config
from mars_ray.core import chaos
from mars_ray.core import schema as S
from mars_ray.core.jsonable import plain as plain_values
from mars_ray.core.lengths import length_grouped_batches
from mars_ray.train.stepper import DS_SUBDIR, DS_TAG

__all__ = [
    "DS_SUBDIR",
    "DS_TAG",
    "MODEL_SUBDIR",
    "TRAIN_STATE",
    "FitResult",
    "FitSpec",
    "fit_reward_model",
    "lora_target_modules",
    "train_loop_per_worker",
    "wrap_lora",
]

MODEL_SUBDIR = "model"
TRAIN_STATE = "train_state.pt"
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


# --------------------------------------------------------------------------------------------
# The per-worker loop: load, restore, passes, report
# --------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """One training run's pairs, read and encoded once."""

    train: dict[str, list]
    val: dict[str, list] | None
    test: dict[str, list] | None
    to_score: dict[str, list] | None
    weights: np.ndarray | None
    margins: np.ndarray | None
    digest: str
    enc_c: Any
    enc_r: Any

    @property
    def n(self) -> int:
        return len(self.train[S.PROMPT])

    @property
    def pair_len(self) -> np.ndarray:
        return np.maximum(self.enc_c.lengths, self.enc_r.lengths)  # a pair's padded width in its batch


def _read_data(config: dict, t: Any, tokenizer: Any, lim: dict[str, int]) -> _Data:
    """The run's pairs and their loss weights / label margins (train.margin_term), checked."""
    from mars_ray.core.losses import normalise_weights
    from mars_ray.models.reward import encode_preferences

    path = config["train_path"]
    extra = [config.get("weights_column"), (config.get("margin_column") or S.MARGIN) if t.margin_term else None]
    train = _read_pairs(path, [c for c in extra if c])
    val = _read_pairs(config["val_path"], []) if config.get("val_path") else None
    test = _read_pairs(config["test_path"], []) if config.get("test_path") else None
    to_score = _read_pairs(config["score_path"], [S.PAIR_ID]) if config.get("score_path") else None
    if len(train[S.PROMPT]) == 0:
        raise ValueError(f"{path}: no training pairs")
    weights = _column_floats(train, config.get("weights_column"), "weights", path)
    if weights is not None:  # mean 1 over the training set: a pair's weight is the same in any batch
        try:
            weights = normalise_weights(weights)
        except ValueError as e:
            raise ValueError(f"{path}: column {config['weights_column']!r}: {e}") from None
    margins = _column_floats(train, extra[1], "label margins, train.margin_term", path, missing=0.0)
    enc_c, enc_r = encode_preferences(tokenizer, train[S.PROMPT], train[S.CHOSEN], train[S.REJECTED], **lim)
    return _Data(train, val, test, to_score, weights, margins, data_hash(train, weights, margins), enc_c, enc_r)


class _Worker:
    """One rank's training run (see :func:`train_loop_per_worker`)."""

    def __init__(self, config: dict) -> None:
        import ray.train
        import torch

        self.config = config
        self.cfg = Config.from_dict(config["config"])
        self.t = self.cfg.train
        self.epoch = int(config.get("epoch", 1))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local = bool(config.get("local", False))
        if not self.local:
            t = self.t
            torch.set_num_threads(int(config.get("threads") or t.threads or max(1, round(t.cpus_per_worker or 1))))
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.lim = dict(
            max_prompt_tokens=self.cfg.data.max_prompt_tokens, max_response_tokens=self.cfg.data.max_response_tokens
        )
        self.step = 0
        self.losses: list[float] = []
        self.pending: list[Any] = []  # per-step losses still on the device
        self.step_times: list[float] = []
        self.train_tokens = 0
        self.prev_local: Path | None = None

    # ---- load
    def load(self) -> None:
        """The model (fp32 weights: the master copy; bf16 is a compute precision), LoRA, tokenizer."""
        import torch

        from mars_ray.models.precision import resolve_precision
        from mars_ray.models.reward import disable_dropout, load_reward_model

        cfg, t = self.cfg, self.t
        from mars_ray.runtime import pick_device

        # the worker's GPU (Ray Train reserved it: train.use_gpu; an error if CUDA cannot use it),
        # the CPU without train.use_gpu or with resources.device cpu (a simulated GPU cluster)
        self.device = pick_device() if t.use_gpu else "cpu"
        self.precision = resolve_precision(t.precision, self.device)
        model, self.tokenizer = load_reward_model(
            self.config["init_model"],
            seed=cfg.seed,
            dtype="float32",
            device=self.device,
            cache_dir=cfg.model.cache_dir,
            offline=cfg.model.offline,
            new_head=True,  # training from a backbone starts its head on purpose (the pipeline says so)
        )
        if t.disable_dropout:
            disable_dropout(model)
        torch.manual_seed(cfg.seed + 7919 * self.epoch)  # LoRA init + dropout: identical on every rank
        if t.lora:
            model = wrap_lora(model, r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout)
        model.train()
        self.model = model

    # ---- restore
    def restore(self) -> None:
        """The checkpoint Ray Train hands a restarted group, the data, the stepper and the RNGs."""
        import ray.train

        from mars_ray.train.stepper import make_stepper

        state, ckpt = None, ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                if (Path(d) / TRAIN_STATE).exists():
                    state = load_train_state(Path(d) / TRAIN_STATE)
        if state is not None:
            missing = set(state["trainable"]) - {n for n, _ in self.model.named_parameters()}
            if missing:
                raise ValueError(f"checkpoint does not match the model (unknown parameters {sorted(missing)[:3]})")
            self.model.load_state_dict(state["trainable"], strict=False)
        self.data = _read_data(self.config, self.t, self.tokenizer, self.lim)
        if state is not None and state.get("data_hash") not in (None, self.data.digest):
            raise ValueError(
                f"{self.config['train_path']}: the checkpoint to resume from was trained on other data (data hash "
                f"{state['data_hash']}, this data {self.data.digest}); refusing to resume. Restore the data it was "
                f"trained on, or delete that run's checkpoints (ray_train/{self.config.get('name') or '<name>'}) "
                "to start over"
            )
        self.stepper = make_stepper(
            self.model,
            self.cfg,
            device=self.device,
            precision=self.precision,
            world=self.world,
            distributed=self.distributed,
        )
        if state is not None:
            with ckpt.as_directory() as d:
                self.stepper.restore(state, d)
            _set_rng_state(state["rng"])
        self.state = state
        if state is not None:
            self.step = int(state["step"])
            self.losses = list(state.get("losses", []))

    # ---- passes
    def total_steps(self) -> int:
        per_rank = math.ceil(self.data.n / self.world)
        total = self.stepper.total_steps(math.ceil(per_rank / self.t.batch_size), self.t.passes)
        return min(total, int(self.t.max_steps)) if self.t.max_steps is not None else total

    def lr_at(self, step: int, total: int) -> float:
        warmup = int(round(self.t.warmup_ratio * total))
        return self.t.lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)

    def read_losses(self) -> None:
        """Move the pending per-step losses to ``losses`` in one host copy; the wait for the
        device (a GPU runs behind the host) lands in the last step's time, so a pass's step times
        still add up to its compute."""
        import torch

        if self.pending:
            t_wait = time.perf_counter()
            self.losses.extend(torch.stack(self.pending).double().cpu().tolist())
            self.pending.clear()
            if self.step_times:
                self.step_times[-1] += time.perf_counter() - t_wait

    def micro_loss(self, idx: np.ndarray) -> Any:
        """The Bradley-Terry loss of one micro-batch (chosen rows first, then rejected)."""
        import torch

        from mars_ray.core.losses import bt_loss, center_penalty
        from mars_ray.models.reward import pad_batch

        d, t = self.data, self.t
        ids = [d.enc_c.input_ids[i] for i in idx] + [d.enc_r.input_ids[i] for i in idx]
        has_types = d.enc_c.token_type_ids is not None
        tts = (
            ([d.enc_c.token_type_ids[i] for i in idx] + [d.enc_r.token_type_ids[i] for i in idx]) if has_types else None
        )
        batch = pad_batch(ids, tts, self.tokenizer.pad_token_id)
        self.train_tokens += int(batch["attention_mask"].sum())
        rewards = self.stepper.rewards({key: v.to(self.device) for key, v in batch.items()})
        b = len(idx)
        w = torch.from_numpy(d.weights[idx]).to(self.device) if d.weights is not None else None
        m = torch.from_numpy(d.margins[idx]).to(self.device) if d.margins is not None else None
        loss = bt_loss(rewards[:b], rewards[b:], weights=w, margin=m)
        if t.center_rewards:
            loss = loss + t.center_rewards * center_penalty(rewards[:b], rewards[b:])
        return loss

    def one_pass(self, p: int, skip: int, total: int) -> None:
        """Pass ``p`` over this rank's shard (from micro-batch ``skip``: a checkpoint inside it)."""
        cfg, t = self.cfg, self.t
        rng = np.random.default_rng([cfg.seed, self.epoch, p])
        mine = _shard(rng.permutation(self.data.n), self.rank, self.world)
        micro = length_grouped_batches(mine, self.data.pair_len, t.batch_size, rng, group=t.length_group)
        acc, n_acc, t0 = None, 0, time.perf_counter()
        every = int(t.checkpoint_steps) if t.checkpoint_steps else 0
        for k, idx in enumerate(micro):
            if k < skip:
                continue
            if self.step >= total:
                break
            if self.rank == 0 and acc is None:  # the first micro-batch of optimizer step `self.step`
                chaos.point(f"train.step.epoch{self.epoch}")  # visit v: before step v - 1 (fault tests)
            loss = self.micro_loss(idx)
            self.stepper.set_lr(self.lr_at(self.step, total))
            took = self.stepper.backward(loss, micro=k, pass_end=k + 1 == len(micro))
            # on the device: no host copy (and no wait for a GPU) per step; read at the pass end
            acc = loss.detach() if acc is None else acc + loss.detach()
            n_acc += 1
            if not took:
                continue
            self.pending.append(acc / n_acc)
            self.step_times.append(time.perf_counter() - t0)
            self.step += 1
            acc, n_acc, t0 = None, 0, time.perf_counter()
            if every and self.step % every == 0 and k + 1 < len(micro) and self.step < total:
                self.read_losses()
                self.checkpoint(self.pass_metrics(p), p, position=k + 1)

    # ---- report
    def pass_metrics(self, passes_done: int) -> dict[str, Any]:
        return _pass_metrics(
            self.losses,
            self.step_times,
            self.train_tokens,
            self.step,
            passes_done,
            self.epoch,
            self.world,
            self.distributed,
        )

    def held_out(self, pairs: dict[str, list], prefix: str) -> dict[str, Any]:
        """Held-out metrics of ``pairs``, scored in the training precision (bf16 where native)."""
        with self.stepper.autocast():
            return _validate(self, pairs, prefix)

    def final_scores(self) -> dict[str, Any] | None:
        """The trained model's rewards of ``score_path`` (the next epoch's margins)."""
        d = self.data.to_score
        if d is None:
            return None
        with self.stepper.autocast():
            rc, rr, _ = _score_sharded(self, d)
        return {S.PAIR_ID: d[S.PAIR_ID], "reward_chosen": rc, "reward_rejected": rr, "margin": rc - rr}

    def checkpoint(self, metrics: dict, passes: int, *, position: int = 0, scores: dict | None = None) -> None:
        """Report ``metrics`` with a checkpoint at the current step (``position``: micro-batches of
        pass ``passes`` done, inside a pass); an in-process run drops the one it supersedes."""
        d = _report(self, metrics, _Progress(passes, position), scores)
        if self.rank == 0:
            chaos.point(f"train.checkpoint.epoch{self.epoch}")
        if self.local and self.prev_local is not None:
            shutil.rmtree(self.prev_local, ignore_errors=True)  # superseded in-process checkpoint
        self.prev_local = d

    # ---- the run
    def run(self) -> dict[str, Any]:
        self.load()
        self.restore()
        state, t = self.state, self.t
        total = self.total_steps()
        passes_done = int(state["passes_done"]) if state else 0
        if state is not None and (passes_done >= t.passes or self.step >= total):
            # Restarted after the last checkpoint was written: report it again and stop.
            metrics = dict(state.get("metrics") or {})
            self.checkpoint(metrics, passes_done)
            return metrics
        resumed_from = self.step if state is not None else None
        position = int(state.get("pass_position", 0)) if state else 0  # micro-batches of a pass already trained
        # The model as loaded, on the test pairs: the "before" of a run (a fresh start only).
        before = {}
        if self.data.test is not None and self.config.get("test_before") and state is None:
            before = self.held_out(self.data.test, "base_test")
        metrics: dict[str, Any] = {}
        for p in range(passes_done, t.passes):
            if self.step >= total:
                break
            self.one_pass(p, position if p == passes_done else 0, total)
            last = p + 1 >= t.passes or self.step >= total
            self.read_losses()
            metrics = self.pass_metrics(p + 1)
            metrics.update(precision=self.precision.compute, precision_reason=self.precision.reason)
            for pairs, prefix in ((self.data.val, "val"), (self.data.test, "test")):
                if last and pairs is not None:
                    metrics.update(self.held_out(pairs, prefix))
            metrics.update(before)
            metrics.update(self.stepper.metrics())
            if resumed_from is not None:
                metrics["resumed_from_step"] = resumed_from
            self.checkpoint(metrics, p + 1, scores=self.final_scores() if last else None)
            if last:
                break
        return metrics


def train_loop_per_worker(config: dict) -> dict:
    """Train one reward model; all inputs in ``config``:

    ``config`` (``Config.to_dict()``), ``init_model`` (model ref or a previous model dir),
    ``train_path`` / ``val_path`` (parquet, PAIR_SCHEMA columns), optional ``weights_column`` and
    ``margin_column`` (used when ``train.margin_term``), ``epoch`` (MARS epoch, seeds the shuffle),
    ``local`` (True when running in-process: keep the caller's thread settings).

    Returns the final metrics (also reported through ``ray.train.report``).
    """
    chaos.adopt(config.get("chaos"))  # the driver's fault-injection rules, on any cluster
    return _Worker(config).run()


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


def _validate(w: _Worker, pairs: dict[str, list], prefix: str) -> dict:
    """Held-out metrics (validation, or test under ``prefix``) from :func:`_score_sharded`."""
    import torch

    from mars_ray.core.losses import bt_loss, pair_metrics

    n = len(pairs[S.PROMPT])
    t0 = time.perf_counter()
    rc, rr, tokens = _score_sharded(w, pairs)
    elapsed = time.perf_counter() - t0
    out = {f"{prefix}_{k}": v for k, v in pair_metrics(rc, rr).items()}
    out[f"{prefix}_loss"] = float(bt_loss(torch.from_numpy(rc), torch.from_numpy(rr))) if n else float("nan")
    out[f"{prefix}_tokens_per_s"] = tokens / elapsed if elapsed > 0 else float("nan")
    return out


def _score_sharded(w: _Worker, pairs: dict[str, list]) -> tuple[np.ndarray, np.ndarray, int]:
    """Rewards of every pair, sharded by rank (equal-size shards), gathered to every rank:
    ``(r_chosen, r_rejected, tokens)`` in input order."""
    import torch

    from mars_ray.models.reward import encode_preferences, score_encoded_pairs

    model, n = w.stepper.module, len(pairs[S.PROMPT])
    mine = _shard(np.arange(n), w.rank, w.world) if n else np.arange(0)
    was_training = model.training
    model.eval()
    # tokenised once: the same encodings are scored and counted
    ec, er = encode_preferences(
        w.tokenizer,
        [pairs[S.PROMPT][i] for i in mine],
        [pairs[S.CHOSEN][i] for i in mine],
        [pairs[S.REJECTED][i] for i in mine],
        **w.lim,
    )
    rc, rr = score_encoded_pairs(model, w.tokenizer, ec, er, batch_size=2 * w.t.batch_size)
    if was_training:
        model.train()
    tokens = int(ec.lengths.sum() + er.lengths.sum())
    if w.distributed and w.world > 1:
        parts: list = [None] * w.world
        torch.distributed.all_gather_object(parts, (mine, rc, rr, tokens))
        full_c = np.empty(n, dtype=np.float32)
        full_r = np.empty(n, dtype=np.float32)
        for idx, c, r, _ in parts:
            full_c[idx], full_r[idx] = c, r
        tokens = sum(x[3] for x in parts)
        rc, rr = full_c, full_r
    return rc, rr, tokens


@dataclass(frozen=True)
class _Progress:
    """Where a checkpoint is: passes done, and micro-batches of the next pass done (inside it)."""

    passes_done: int
    pass_position: int = 0


def _report(w: _Worker, metrics: dict, where: _Progress, scores: dict | None) -> Path | None:
    """Rank 0 writes and reports the checkpoint (others report metrics only); returns the local
    directory when it still exists (in-process runs), else None. ``scores`` (columns) goes into the
    checkpoint as :data:`SCORES_FILE`."""
    import ray.train
    import torch

    st, rank, model = w.stepper, w.rank, w.stepper.module
    master = st.master_weights(rank)  # DeepSpeed bf16: save the fp32 masters, not bf16 copies
    if st.ds_stage == 3:  # parameters are partitioned: gather them (collective) before saving
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            plain = _plain_model(model, master) if rank == 0 else None
            trainable = _trainable_state(model) if rank == 0 else None
    else:
        plain = _plain_model(model, master) if rank == 0 else None
        trainable = _trainable_state(model) if rank == 0 else None
    d = Path(tempfile.mkdtemp(prefix="mars_ray_ckpt_"))
    st.save(d)
    engine_files = st.ds_stage is not None
    if rank != 0:
        if not engine_files:
            shutil.rmtree(d, ignore_errors=True)
            ray.train.report(metrics, checkpoint=None)
            return None
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        if not w.local:
            shutil.rmtree(d, ignore_errors=True)
        return None
    # In-process runs hand the directory itself back as the checkpoint: it must outlive this call.
    plain.save_pretrained(d / MODEL_SUBDIR)
    w.tokenizer.save_pretrained(d / MODEL_SUBDIR)
    if scores is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mars_ray.core.atomic import atomic_path

        with atomic_path(d / SCORES_FILE) as tmp:
            pq.write_table(pa.table(scores), tmp)
    torch.save(
        {
            "trainable": trainable,
            "optimizer": st.optimizer_state(),
            "rng": _rng_state(),
            "passes_done": where.passes_done,
            "step": w.step,
            "pass_position": int(where.pass_position),  # micro-batches of pass `passes_done` done (mid-pass)
            "data_hash": w.data.digest,
            # the history averaged over workers (what was reported), identical on every rank;
            # plain Python values (no numpy scalars), so the file loads with weights_only
            "losses": plain_values(list(metrics.get("train_loss_history", w.losses))),
            "metrics": plain_values(metrics),
        },
        d / TRAIN_STATE,
    )
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
    if not w.local:
        shutil.rmtree(d, ignore_errors=True)  # uploaded synchronously to storage_path
        return None
    return d


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSpec:
    """One training run: what it starts from, trains on and scores, and where it lives.

    ``test_path``: also score these pairs with the final model (``test_*`` metrics, as
    ``mars_ray.pipeline`` computes them); ``test_before``: and with the model as loaded, before any
    step (``base_test_*``; a fresh start only). ``score_path``: the trained model's rewards of these
    pairs go into the checkpoint (``scores_path`` in the result: pair_id, reward_chosen,
    reward_rejected, margin), the next MARS epoch's margins without another model load.
    ``weights_column`` / ``margin_column``: per-pair loss weights and label margins
    (``train.margin_term``). ``epoch`` seeds the shuffle. ``max_failures``: worker-group restarts
    (from the last checkpoint) before giving up.
    """

    init_model: str
    train_path: str | os.PathLike
    val_path: str | os.PathLike | None
    run_dir: str | os.PathLike
    name: str
    test_path: str | os.PathLike | None = None
    test_before: bool = False
    score_path: str | os.PathLike | None = None
    weights_column: str | None = None
    margin_column: str | None = None
    epoch: int = 1
    max_failures: int = 0

    def loop_config(self, cfg: Config, *, local: bool, threads: int | None) -> dict[str, Any]:
        """What every worker receives (plain values: no globals, no config object)."""

        def absolute(p: str | os.PathLike | None) -> str | None:
            return str(Path(p).resolve()) if p else None

        return {
            "config": cfg.to_dict(),
            "init_model": str(self.init_model),
            "train_path": absolute(self.train_path),
            "val_path": absolute(self.val_path),
            "test_path": absolute(self.test_path),
            "test_before": bool(self.test_before),
            "score_path": absolute(self.score_path),
            "weights_column": self.weights_column,
            "margin_column": self.margin_column,
            "epoch": int(self.epoch),
            "local": local,
            "chaos": chaos.settings(),
            "name": self.name,
            "threads": threads,
        }


class FitResult(dict):
    """A finished training run's final metrics (what the last report carried), plus where its
    model (``model_dir``: a plain HF folder, LoRA merged), checkpoint and scores are."""

    @property
    def model_dir(self) -> str:
        return str(self["model_dir"])

    @property
    def checkpoint_dir(self) -> str:
        return str(self["checkpoint_dir"])

    @property
    def scores_path(self) -> str | None:
        return self.get("scores_path")


def fit_reward_model(cfg: Config, spec: FitSpec) -> FitResult:
    """Train a reward model with Ray Train (the run :class:`FitSpec` describes).

    ``train.num_workers=0`` runs the loop in this process (no workers; tests). Re-running with the
    same ``run_dir`` / ``name`` resumes from the latest checkpoint (Ray Train's behaviour). Faults
    for the recovery tests come through :mod:`mars_ray.core.chaos` (point ``train.step.epoch<t>``).

    Raises:
        ValueError: invalid configuration (checked before anything starts).
        ray.train.WorkerGroupError / RuntimeError: training failed (after ``max_failures`` retries).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mars_ray.runtime import torch_config

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
    run_dir = Path(spec.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.loop_config(cfg, local=local, threads=threads),
        torch_config=torch_config(use_gpu=t.use_gpu, backend=t.backend, device=cfg.resources.device),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=None
            if local
            else {"CPU": t.cpus_per_worker if t.cpus_per_worker is not None else 1.0},
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {spec.name!r} reported no checkpoint")
    ckpt_dir = Path(result.checkpoint.path)
    if local:  # move the in-process checkpoint next to the Ray runs
        from mars_ray.core.atomic import move_dir

        try:
            ckpt_dir = move_dir(ckpt_dir, run_dir / spec.name / "checkpoint_local")
        except OSError:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a temporary checkpoint no one resumes from
            raise
    out = FitResult(result.metrics or {})
    out["checkpoint_dir"] = str(ckpt_dir)
    out["model_dir"] = str(ckpt_dir / MODEL_SUBDIR)
    if spec.score_path and (ckpt_dir / SCORES_FILE).exists():
        out["scores_path"] = str(ckpt_dir / SCORES_FILE)
    if local:
        from mars_ray.runtime import release_memory

        del trainer, result
        release_memory()  # the model and optimizer this process trained are garbage now
    return out
