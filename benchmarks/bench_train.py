"""Reward-model training throughput: one Ray Train worker (mars_ray) vs TRL's RewardTrainer.

Same model (``--family minilm``: builtin:minilm, an encoder; ``--family smollm2``: builtin:smollm2,
a decoder reward model read through its chat template), same 1,000 real HH-RLHF helpful-base pairs offered to every variant,
same batch (8 pairs = 16 sequences per step), same maximum length (``--max-length``, default 512 =
MiniLM's position table), same learning rate (mars_ray's ``train.lr``, constant, no warm-up), one
pass, 2 torch threads. Each variant runs in its own fresh process; the table gives medians over
``--reps``, ratios against TRL measured in the same run, and peak memory. Run::

    RAY_AUTH_MODE=disabled python benchmarks/bench_train.py [--pairs 1000] [--heldout 200] \
        [--reps 1] [--only trl,ours,...] [--max-length 512] [--save results.jsonl [--resume]]

(about 45 minutes on 2 idle cores with the defaults; ``--pairs 32 --heldout 16`` is a smoke test).
On a shared machine, run the variants one at a time when it is idle (``--only trl --save F --resume``,
then the next, ...) and print the table from the saved rows with the full ``--only`` list and
``--resume``; the ``load5`` column shows whether other work competed.

Data: the HH-RLHF helpful-base file in ../shared/data (only the test split is there), read with
mars_ray's reader (no split, input order, 6 unusable rows quarantined): rows [0, pairs) are the
training pairs, the next ``--heldout`` rows are held out. Every trained model is then scored on all
held-out pairs (not timed).

Variants:
- ``peak``: not a training run; fp32 and bf16 GEMM throughput of this machine (torch.mm of
  2048x2048 matrices, 2 threads, median of 10 after warm-up), the denominators of "MFU".
- ``trl``: ``trl.RewardTrainer`` + ``RewardConfig`` as shipped except what must match (fp32 because
  ``bf16=False``, ``use_cpu``, batch 8, ``max_length``, lr, constant schedule, 1 epoch, no saving
  or logging back-ends). So gradient checkpointing is on and dropout off (TRL's defaults). The
  BERT tokenizer has no EOS token, so ``eos_token="[SEP]"`` (TRL appends it to the text: a
  sequence is ``[CLS] prompt response [SEP] [SEP]``). TRL drops every pair whose chosen or
  rejected sequence is longer than ``max_length``; it starts from the same initial model object as
  ours (mars_ray's ``load_reward_model``, same seeded score head).
- ``trl_nockpt``: the same with ``gradient_checkpointing=False`` (TRL's fastest fp32 setting here).
- ``trl_bf16``: TRL without gradient checkpointing and with ``bf16=True`` (transformers' CPU
  autocast): TRL's fastest setting on a CPU with native bf16.
- ``ours``: ``mars_ray.train.loop.fit_reward_model``, one Ray Train worker with 2 CPUs, full
  fine-tune (``train.lora=false``), ``train.precision fp32``, no validation set (held-out scoring
  is done afterwards, the same way as for TRL). Pairs are never dropped: the prompt is cut from the
  left. Batches are length-grouped (``train.length_group``) and dropout is off
  (``train.disable_dropout``), both mars_ray's defaults; dropout off is TRL's default too.
- ``ours_auto``: the same with ``train.precision auto``, the default: where bf16 is native, fp32
  master weights and AdamW state with the forward and backward matmuls in bf16 under
  ``torch.autocast`` and the reward head in fp32; fp32 elsewhere. Held-out scoring: ``model.dtype
  auto`` (bf16 weights where native).
- ``ours_lora``: LoRA (mars_ray's default, r=16 on the attention projections, head trained in
  full), ``train.precision auto``.
- ``ours_zero2``: full fine-tuning under DeepSpeed ZeRO-2 (one worker, torch AdamW, bf16 section on
  where the precision policy picks bf16).
- ``probe`` (not in the default list; its notes are printed, it is no table row): in-process
  timings of the pieces of one training step on real batches, random vs length-grouped batches,
  fp32 vs bf16 autocast, and the optimizer step alone.

Columns:
- ``step pairs/s``: pairs trained / time spent in the training steps (first step start to last
  optimizer step end; for TRL from ``on_train_begin`` to the last ``on_step_end`` callback, for
  ours the loop's own ``step_time_s * steps``). Excludes Ray start-up, model loading, tokenisation
  and saving. ``vs trl`` is the ratio of these.
- ``e2e s`` / ``e2e pairs/s``: offered pairs / wall time from nothing to a trained model on disk:
  TRL: model load + trainer construction (tokenisation, filter) + train + save_model; ours:
  ``ray.init`` + ``fit_reward_model`` (worker start, model load, tokenisation, train, checkpoint).
- ``trained/offered``: pairs that were actually trained on (TRL's length filter drops some).
- ``pad %``: share of the token slots fed to the model that were padding (TRL: counted in its
  collator; ours: recomputed from the loop's shuffle, which is deterministic given the seed, and
  cross-checked against the real-token count the loop reports).
- ``MFU %``: achieved model FLOP/s / measured GEMM peak of the dtype used (fp32 peak for fp32,
  bf16 peak for bf16). Model FLOPs per step = ``k * N * T + 4 * k/2 * L * d * sum(s_i^2)`` with
  N = parameters of the transformer layers (embeddings, pooler and the score head excluded: they
  are lookups or act once per sequence), T = real (non-padding) tokens, s_i = real length of each
  sequence, L = layers, d = hidden size; k = 6 for full fine-tuning (forward 2, backward 4) and
  k = 4 for LoRA (frozen weights need input gradients but no weight gradients). Recomputation by
  gradient checkpointing and padding are not counted (they are waste, as in the usual MFU).
- ``acc``: held-out accuracy (r_chosen > r_rejected) of the trained model on its own input format
  (ours: mars_ray's encoding ``[CLS] prompt [SEP] response [SEP]``; TRL: its training format, the
  prompt cut from the left when too long, so no held-out pair is dropped). ``acc mars-enc``: every
  model scored with ``mars_ray.models.reward.score_pairs`` (the same code for all). With 200
  held-out pairs the standard error of an accuracy is about 3.5 points.
- ``peak RSS MB``: whole process tree (driver + Ray's processes), summed RSS (a shared library is
  counted once per process that maps it), sampled every 0.5 s; ``peak PSS MB``: the same tree's
  proportional set size (shared pages split between the processes that share them: what the tree
  costs the machine). ``--save`` rows also keep the largest processes at the RSS peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED_DATA, peak_rss_mb, run_variant
from bench_scoring import TreeRss

HH = SHARED_DATA / "hh_rlhf_helpful_base_test.jsonl"
FAMILIES = {"minilm": "builtin:minilm", "smollm2": "builtin:smollm2"}
MODEL = FAMILIES["minilm"]  # set from --family in main()
BATCH = 8  # pairs per optimizer step (16 sequences)
THREADS = 2
SCORE_BATCH = 32

NAMES = {
    "peak": "GEMM peak (fp32, bf16)",
    "trl": "TRL RewardTrainer fp32",
    "trl_nockpt": "TRL fp32, no grad ckpt",
    "trl_bf16": "TRL bf16, no grad ckpt",
    "ours": "ours Ray Train 1x2 fp32",
    "ours_auto": "ours Ray Train 1x2 auto",
    "ours_lora": "ours Ray Train 1x2 LoRA auto",
    "ours_zero2": "ours DeepSpeed ZeRO-2 auto",
    "probe": "step anatomy probe",
}
DEFAULT = "trl_nockpt,trl_bf16,ours,ours_auto,ours_lora"


# ------------------------------------------------------------------------------ shared helpers


def load_split(path: Path, n_train: int, n_heldout: int):
    """(train, heldout) pyarrow tables: consecutive rows of the file, in input order."""
    from mars_ray.config import Config
    from mars_ray.data import read_preferences

    cfg = Config.load(overrides={"data.path": str(path), "data.val_fraction": 0, "data.test_fraction": 0})
    table = read_preferences(cfg.data, seed=cfg.seed).table
    if n_train + n_heldout > table.num_rows:
        raise SystemExit(f"{path.name}: {table.num_rows} usable pairs < {n_train} + {n_heldout}")
    return table.slice(0, n_train), table.slice(n_train, n_heldout)


def columns(table) -> tuple[list[str], list[str], list[str]]:
    return tuple(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))


def base_cfg(**over):
    from mars_ray.config import Config

    o = {
        "data.path": str(HH),
        "data.val_fraction": 0,
        "data.test_fraction": 0,
        "train.batch_size": BATCH,
        "train.passes": 1,
        "train.num_workers": 1,
        "train.cpus_per_worker": THREADS,
        "resources.num_cpus": THREADS,
        "model.offline": True,
    }
    o.update(over)
    return Config.load(overrides=o)


def model_dir(max_length: int, tmp: Path) -> str:
    """MiniLM's folder; for a max length below its 512 positions, a copy (weights symlinked) whose
    tokenizer says ``model_max_length = max_length`` (mars_ray's encoder caps the total length at
    the tokenizer's limit, so this is how the loop gets the same cap as TRL without code changes)."""
    from mars_ray.models import resolve_model

    src = Path(resolve_model(MODEL).path)
    cfg = json.loads((src / "config.json").read_text())
    if max_length >= int(cfg.get("max_position_embeddings", 512)):
        return str(src)
    dst = tmp / f"minilm_max{max_length}"
    if not dst.exists():
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.name != "tokenizer_config.json":
                (dst / f.name).symlink_to(f)
        tc = json.loads((src / "tokenizer_config.json").read_text())
        tc["model_max_length"] = max_length
        (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return str(dst)


def flop_shape(model) -> dict:
    """N (transformer-layer parameters), layers and hidden size of a (possibly peft-wrapped) BERT
    (``encoder.layer.N``) or Llama-style decoder (``model.layers.N``)."""
    cfg = model.config
    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if (".encoder.layer." in f".{name}" or ".layers." in f".{name}") and "lora_" not in name
    )
    return {"n_layer_params": int(n), "layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size)}


def model_flops(shape: dict, real_tokens: int, sum_sq_len: int, k: int) -> float:
    return k * shape["n_layer_params"] * real_tokens + 2 * k * shape["layers"] * shape["hidden"] * sum_sq_len


def heldout_accuracy(model_path: str, heldout, *, trl_format: bool, max_length: int, dtype: str = "float32") -> dict:
    """Accuracy on the held-out pairs with mars_ray's score_pairs and, when ``trl_format``, with
    TRL's training format as well (``[CLS] prompt+response [SEP] [SEP]``, token types 0; when too
    long the prompt loses its beginning, [CLS] is kept)."""
    import numpy as np
    import torch

    from mars_ray.models.reward import load_reward_model, score_pairs

    model, tok = load_reward_model(model_path, dtype=dtype)
    p, c, r = columns(heldout)
    rc, rr = score_pairs(
        model,
        tok,
        p,
        c,
        r,
        batch_size=SCORE_BATCH,
        max_prompt_tokens=512,
        max_response_tokens=192,
        max_length=max_length,
    )
    out = {"acc_mars_enc": float(np.mean(rc > rr))}
    if not trl_format:
        out["acc"] = out["acc_mars_enc"]
        return out
    end = tok.sep_token or tok.eos_token  # what TRL appended in training (eos_token=...)
    texts = [a + b + end for a, b in zip(p + p, c + r)]
    ids = tok(texts, verbose=False)["input_ids"]
    cut = sum(len(x) > max_length for x in ids)
    ids = [x if len(x) <= max_length else x[:1] + x[-(max_length - 1) :] for x in ids]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    rewards = np.empty(len(ids), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(ids), SCORE_BATCH):
            idx = order[s : s + SCORE_BATCH]
            w = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), w), tok.pad_token_id, dtype=torch.long)
            m = torch.zeros((len(idx), w), dtype=torch.long)
            for j, i in enumerate(idx):
                x[j, : len(ids[i])] = torch.tensor(ids[i])
                m[j, : len(ids[i])] = 1
            rewards[idx] = model(input_ids=x, attention_mask=m).logits[:, 0].float().numpy()
    n = len(p)
    out["acc"] = float(np.mean(rewards[:n] > rewards[n:]))
    out["heldout_seqs_cut"] = int(cut)
    return out


# ------------------------------------------------------------------------------ variants


def gemm_peak() -> dict:
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 2048
        g = torch.Generator().manual_seed(0)
        # A CPU without native bf16 matmul (no AVX512-BF16/AMX) takes a slow path: measure it on a
        # smaller matrix rather than for minutes.
        probe = torch.randn(256, 256, generator=g).to(dt)
        t0 = time.perf_counter()
        torch.mm(probe, probe)
        if (time.perf_counter() - t0) * (n / 256) ** 3 > 2.0:
            n = 512
        a = torch.randn(n, n, generator=g).to(dt)
        b = torch.randn(n, n, generator=g).to(dt)
        for _ in range(2):
            torch.mm(a, b)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t0)
        out[f"peak_{name}_flops"] = 2 * n**3 / statistics.median(ts)
        out[f"peak_{name}_n"] = n
    return out


def run_trl(train, heldout, args, tmp: Path, *, checkpointing: bool, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from mars_ray.models.reward import load_reward_model

    cfg = base_cfg()
    prompts, chosen, rejected = columns(train)
    ds = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})

    stats = {"slots": 0, "real": 0, "sumsq": 0}

    class CountingCollator:
        """TRL's own collator; counts token slots, real tokens and squared lengths of each batch."""

        def __init__(self, pad_id):
            self.inner = DataCollatorForPreference(pad_token_id=pad_id)

        def __call__(self, examples):
            batch = self.inner(examples)
            lens = batch["attention_mask"].sum(dim=1)
            stats["slots"] += int(batch["input_ids"].numel())
            stats["real"] += int(lens.sum())
            stats["sumsq"] += int((lens * lens).sum())
            return batch

    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    out_dir = tmp / "trl_out"
    t0 = time.perf_counter()
    model, tok = load_reward_model(model_dir(args.max_length, tmp), seed=cfg.seed, dtype="float32", new_head=True)
    shape = flop_shape(model)
    rc = RewardConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=args.max_length,
        eos_token=tok.sep_token or tok.eos_token,
        bf16=bf16,
        use_cpu=True,
        gradient_checkpointing=checkpointing,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(
        model=model,
        args=rc,
        train_dataset=ds,
        processing_class=tok,
        data_collator=CountingCollator(tok.pad_token_id),
        callbacks=[StepClock()],
    )
    trained = len(trainer.train_dataset)
    torch.set_num_threads(THREADS)
    trainer.train()
    trainer.save_model(str(out_dir / "final"))
    e2e = time.perf_counter() - t0
    step_s = marks[-1] - marks[0]
    info = {
        "step_seconds": step_s,
        "e2e_seconds": e2e,
        "trained": trained,
        "offered": train.num_rows,
        "steps": len(marks) - 1,
        "real_tokens": stats["real"],
        "slots": stats["slots"],
        "flops": model_flops(shape, stats["real"], stats["sumsq"], 6),
        "dtype": "bf16" if bf16 else "fp32",
        **shape,
        "threads_seen": torch.get_num_threads(),
    }
    info.update(heldout_accuracy(str(out_dir / "final"), heldout, trl_format=True, max_length=args.max_length))
    return info


def _tokenizer(folder: str):
    """The tokenizer as :func:`mars_ray.models.reward.load_reward_model` sets it up (pad token,
    length capped at the position table), without loading any weights."""
    from mars_ray.models.resolve import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = json.loads((Path(resolve_model(folder).path) / "config.json").read_text())
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and tok.model_max_length > max_pos:
        tok.model_max_length = max_pos
    return tok


def _meta_model(folder: str):
    """The model's modules on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from mars_ray.models.resolve import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(folder).path, num_labels=1)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def ours_padding(train, args, tmp: Path, seed: int) -> dict:
    """Token slots / real tokens / squared lengths of the loop's batches, recomputed from its
    deterministic shuffle and length grouping (MARS epoch 1, pass 0, one worker, the config's
    ``train.length_group``), plus plain random batches of the same shuffle for comparison."""
    import numpy as np

    from mars_ray.core.lengths import length_grouped_batches
    from mars_ray.models.reward import encode_preferences

    tok = _tokenizer(model_dir(args.max_length, tmp))
    p, c, r = columns(train)
    ec, er = encode_preferences(tok, p, c, r, max_prompt_tokens=512, max_response_tokens=192)
    lc, lr = ec.lengths, er.lengths
    n = len(lc)

    longest = np.maximum(lc, lr)

    def slots(batches):
        return sum(2 * len(idx) * int(longest[idx].max()) for idx in batches)

    rng = np.random.default_rng([seed, 1, 0])
    perm = rng.permutation(n)
    loop = length_grouped_batches(perm, longest, BATCH, rng, group=base_cfg().train.length_group)
    plain = [perm[s : s + BATCH] for s in range(0, n, BATCH)]
    return {
        "real_tokens": int(lc.sum() + lr.sum()),
        "slots": slots(loop),
        "slots_random": slots(plain),
        "sumsq": int((lc.astype(np.int64) ** 2).sum() + (lr.astype(np.int64) ** 2).sum()),
        "prompts_cut": int(ec.prompt_truncated),
        "responses_cut": int(ec.response_truncated + er.response_truncated),
    }


def run_ours(train, heldout, args, tmp: Path, *, lora: bool, precision: str, zero2: bool = False) -> dict:
    import pyarrow.parquet as pq
    import ray

    from mars_ray.runtime import init_ray
    from mars_ray.train.loop import FitSpec, fit_reward_model

    over = {"train.lora": lora, "train.precision": precision}
    if zero2:
        over.update({"deepspeed.enabled": True, "deepspeed.stage": 2})
    cfg = base_cfg(**over)
    init = model_dir(args.max_length, tmp)
    # Neither needs the weights: the driver of a real run holds no model, so this one does not either
    # (its memory is part of the measured tree).
    pad = ours_padding(train, args, tmp, cfg.seed)
    shape = flop_shape(_meta_model(init))  # LoRA's base layers are the same; its adapters are not counted
    train_path = tmp / "train.parquet"
    pq.write_table(train, train_path)
    t0 = time.perf_counter()
    init_ray(cfg.resources, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    m = fit_reward_model(
        cfg,
        FitSpec(
            init_model=init,
            train_path=train_path,
            val_path=None,
            run_dir=tmp / "runs",
            name=f"bench_{int(time.time() * 1000)}",
        ),
    )
    e2e = time.perf_counter() - t0
    ray.shutdown()  # not timed
    step_s = float(m["step_time_s"]) * int(m["steps"])
    loop_tokens = float(m["train_tokens_per_s"]) * step_s
    k = 4 if lora else 6
    info = {
        "step_seconds": step_s,
        "e2e_seconds": e2e,
        "ray_init_s": t_ray,
        "trained": train.num_rows,
        "offered": train.num_rows,
        "steps": int(m["steps"]),
        "real_tokens": pad["real_tokens"],
        "loop_real_tokens": round(loop_tokens),
        "slots": pad["slots"],
        "slots_random": pad["slots_random"],
        "prompts_cut": pad["prompts_cut"],
        "responses_cut": pad["responses_cut"],
        "flops": model_flops(shape, pad["real_tokens"], pad["sumsq"], k),
        "dtype": m["precision"],
        "precision_reason": m["precision_reason"],
        "train_loss_first": m.get("train_loss_first"),
        "train_loss_last": m.get("train_loss_last"),
        **shape,
    }
    # scored the way this precision serves it (model.dtype auto: bf16 weights where native)
    info.update(
        heldout_accuracy(
            m["model_dir"],
            heldout,
            trl_format=False,
            max_length=args.max_length,
            dtype="float32" if precision == "fp32" else "auto",
        )
    )
    return info


def run_probe(train, heldout, args, tmp: Path) -> dict:
    """Where the time of one fp32 full fine-tuning step goes (in-process, the loop's code path:
    pad_batch, forward over 16 sequences, BT loss, backward, clip, AdamW)."""
    import numpy as np
    import torch

    from mars_ray.core.losses import bt_loss
    from mars_ray.models.reward import encode_preferences, load_reward_model, pad_batch

    cfg = base_cfg()
    torch.set_num_threads(THREADS)
    model, tok = load_reward_model(model_dir(args.max_length, tmp), seed=cfg.seed, dtype="float32", new_head=True)
    model.train()
    p, c, r = columns(train)
    ec, er = encode_preferences(tok, p, c, r, max_prompt_tokens=512, max_response_tokens=192)
    n = len(ec)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    perm = np.random.default_rng([cfg.seed, 1, 0]).permutation(n)
    longest = np.maximum(ec.lengths, er.lengths)
    grouped = np.argsort(-longest, kind="stable")
    # the same 6 random batches, and 6 length-grouped batches spread over the length range
    nb = max(1, min(6, n // BATCH))
    picks = {"random": [perm[i * BATCH : (i + 1) * BATCH] for i in range(nb)]}
    starts = np.linspace(0, max(0, n - BATCH), nb).astype(int)
    picks["grouped"] = [grouped[s : s + BATCH] for s in starts]

    def batch_of(idx):
        ids = [ec.input_ids[i] for i in idx] + [er.input_ids[i] for i in idx]
        tts = [ec.token_type_ids[i] for i in idx] + [er.token_type_ids[i] for i in idx]
        return pad_batch(ids, tts, tok.pad_token_id)

    def fwd_bwd(b, autocast: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            rew = model(**b).logits[:, 0].float()
        k = rew.shape[0] // 2
        bt_loss(rew[:k], rew[k:]).backward()

    out: dict = {}
    fwd_bwd(batch_of(picks["random"][0]), False)  # warm-up
    for kind, batches in picks.items():
        for ac in (False, True):
            ts, real, slots = [], 0, 0
            for idx in batches:
                t0 = time.perf_counter()
                b = batch_of(idx)
                fwd_bwd(b, ac)
                ts.append(time.perf_counter() - t0)
                real += int(b["attention_mask"].sum())
                slots += int(b["attention_mask"].numel())
                opt.zero_grad(set_to_none=True)
            key = f"{kind}_{'bf16ac' if ac else 'fp32'}"
            out[f"{key}_fwdbwd_s_per_step"] = sum(ts) / len(ts)
            out[f"{key}_real_tokens_per_s"] = real / sum(ts)
            out[f"{kind}_pad_frac"] = 1 - real / slots
    t_pad = []
    for idx in picks["random"]:
        t0 = time.perf_counter()
        batch_of(idx)
        t_pad.append(time.perf_counter() - t0)
    out["pad_batch_s"] = statistics.median(t_pad)
    fwd_bwd(batch_of(picks["random"][0]), False)
    t_opt = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t_opt.append(time.perf_counter() - t0)
    out["clip_adamw_s"] = statistics.median(t_opt)
    out["params_total"] = sum(q.numel() for q in params)
    out["params_embeddings"] = sum(q.numel() for name, q in model.named_parameters() if "embeddings" in name)
    return out


def child(variant: str, reps: int, args) -> None:
    import torch  # imports are not timed (every variant pays them)
    import transformers  # noqa: F401

    torch.set_num_threads(THREADS)
    if variant == "peak":
        res = [gemm_peak() for _ in range(reps)]
        print(json.dumps({k: statistics.median(r[k] for r in res) for k in res[0]} | {"peak_rss_mb": peak_rss_mb()}))
        return
    if variant.startswith("trl"):
        import trl  # noqa: F401
    else:
        import ray.train.torch  # noqa: F401
    train, heldout = load_split(args.file, args.pairs, args.heldout)
    infos = []
    # a coarser sampling: scanning Ray's ~20 processes every 0.1 s costs a few % of a core
    with TreeRss(every=0.5, pss=True) as rss:
        for _ in range(reps):
            tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
            try:
                if variant == "trl":
                    infos.append(run_trl(train, heldout, args, tmp, checkpointing=True))
                elif variant == "trl_nockpt":
                    infos.append(run_trl(train, heldout, args, tmp, checkpointing=False))
                elif variant == "trl_bf16":
                    infos.append(run_trl(train, heldout, args, tmp, checkpointing=False, bf16=True))
                elif variant == "ours":
                    infos.append(run_ours(train, heldout, args, tmp, lora=False, precision="fp32"))
                elif variant == "ours_auto":
                    infos.append(run_ours(train, heldout, args, tmp, lora=False, precision="auto"))
                elif variant == "ours_lora":
                    infos.append(run_ours(train, heldout, args, tmp, lora=True, precision="auto"))
                elif variant == "ours_zero2":
                    infos.append(run_ours(train, heldout, args, tmp, lora=False, precision="auto", zero2=True))
                elif variant == "probe":
                    infos.append(run_probe(train, heldout, args, tmp))
                else:
                    raise SystemExit(f"unknown variant {variant}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "runs": infos,
        "peak_rss_mb": rss.peak_mb or peak_rss_mb(),
        "peak_pss_mb": rss.peak_pss / 2**20,
        "peak_detail": [(name, round(b / 2**20)) for name, b in rss.peak_detail[:10]],
        "peak_pss_detail": [(name, round(b / 2**20)) for name, b in rss.peak_pss_detail[:12]],
        "driver_rss_mb": peak_rss_mb(),
        "cpu_s_per_rep": rss.cpu_s / max(reps, 1),
        "load5": round(os.getloadavg()[1], 2),
    }
    sys.stdout.flush()
    print("\n" + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------ driver


def med(r: dict, key: str) -> float:
    vals = [x[key] for x in r["runs"] if x.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def report(rows: list[dict], peak: dict, a) -> str:
    lines = []
    pf, pb = peak["peak_fp32_flops"], peak["peak_bf16_flops"]
    lines.append(
        f"GEMM peak (torch.mm, {THREADS} threads; n={peak.get('peak_fp32_n', 2048)} fp32, "
        f"n={peak.get('peak_bf16_n', 2048)} bf16): fp32 {pf / 1e9:.0f} GFLOP/s, "
        f"bf16 {pb / 1e9:.1f} GFLOP/s ({pb / pf:.2f}x)"
    )
    train_rows = [r for r in rows if r["key"] not in ("peak", "probe")]
    if train_rows:
        # the baseline: TRL's fastest setting in this run (by training-step throughput)
        trls = [r for r in train_rows if r["key"].startswith("trl")]
        base = max(trls, key=lambda r: med(r, "trained") / med(r, "step_seconds"), default=None)
        b_step = med(base, "trained") / med(base, "step_seconds") if base else None
        b_e2e = med(base, "offered") / med(base, "e2e_seconds") if base else None
        b_pss = base.get("peak_pss_mb") if base else None
        lines.append(
            f"{a.file.name}: {a.pairs} pairs offered, {a.heldout} held out, {MODEL}, batch {BATCH} pairs, "
            f"max length {a.max_length}, 1 pass; each variant in a fresh process (median of reps)"
        )
        hdr = (
            f"{'variant':28s} {'reps':>4s} {'step s':>7s} {'step pairs/s':>12s} {'vs trl':>7s} {'e2e s':>7s} "
            f"{'e2e pairs/s':>11s} {'vs trl':>7s} {'trained/offered':>15s} {'tok/s':>6s} {'pad %':>5s} "
            f"{'MFU %':>5s} {'acc':>5s} {'acc mars-enc':>12s} {'peak RSS MB':>11s} {'peak PSS MB':>11s} "
            f"{'PSS vs trl':>10s} {'load5':>5s}"
        )
        lines.append(hdr)
        for r in train_rows:
            step_s, e2e = med(r, "step_seconds"), med(r, "e2e_seconds")
            trained, offered = med(r, "trained"), med(r, "offered")
            sp = trained / step_s
            ep = offered / e2e
            peak_d = pb if r["runs"][0]["dtype"] == "bf16" else pf
            pss = r.get("peak_pss_mb") or float("nan")
            rp = f"{pss / b_pss:9.2f}x" if b_pss else "       n/a"
            mfu = med(r, "flops") / step_s / peak_d
            pad = 1 - med(r, "real_tokens") / med(r, "slots")
            rs = f"{sp / b_step:6.2f}x" if b_step else "    n/a"
            re_ = f"{ep / b_e2e:6.2f}x" if b_e2e else "    n/a"
            lines.append(
                f"{r['variant']:28s} {r['reps']:4d} {step_s:7.1f} {sp:12.2f} {rs} {e2e:7.1f} {ep:11.2f} {re_} "
                f"{f'{trained:.0f}/{offered:.0f}':>15s} {med(r, 'real_tokens') / step_s:6.0f} {100 * pad:5.1f} "
                f"{100 * mfu:5.1f} {med(r, 'acc'):5.3f} {med(r, 'acc_mars_enc'):12.3f} {r['peak_rss_mb']:11.0f} "
                f"{pss:11.0f} {rp} {r['load5']:5.1f}"
            )
        lines.append(
            f"vs trl: against {base['variant'] if base else 'TRL'} (TRL's fastest setting in this run). "
            "step: training steps only; e2e: from nothing to a trained model on disk (TRL: load, "
            "tokenise+filter, train, save; ours: ray.init, workers, load, tokenise, train, checkpoint). "
            "load5 > 2 means other work competed for the 2 cores."
        )
        for r in train_rows:
            x = r["runs"][0]
            if x.get("precision_reason"):
                lines.append(f"{r['variant']}: precision {x['dtype']} ({x['precision_reason']})")
            if r.get("peak_pss_detail"):
                top = ", ".join(f"{n.rsplit('/', 1)[-1]} {mb}" for n, mb in r["peak_pss_detail"][:12])
                lines.append(f"{r['variant']}: processes at the PSS peak (MB): {top}")
            if "ray_init_s" in x:
                lines.append(
                    f"{r['variant']}: ray.init {med(r, 'ray_init_s'):.1f} s, "
                    f"outside the steps {med(r, 'e2e_seconds') - med(r, 'step_seconds'):.1f} s; "
                    f"padding {100 * (1 - x['real_tokens'] / x['slots']):.1f}% with the loop's "
                    f"length-grouped batches (plain random batches would pad "
                    f"{100 * (1 - x['real_tokens'] / x['slots_random']):.1f}%); real tokens "
                    f"recomputed {x['real_tokens']} vs loop-reported {x['loop_real_tokens']}; "
                    f"{x['prompts_cut']} prompts cut from the left; loss {x['train_loss_first']:.3f} -> "
                    f"{x['train_loss_last']:.3f}"
                )
            else:
                lines.append(
                    f"{r['variant']}: dropped {x['offered'] - x['trained']} of {x['offered']} pairs "
                    f"(a sequence > {a.max_length} tokens); {x['steps']} steps; held-out sequences "
                    f"longer than {a.max_length} scored with the prompt cut: {x.get('heldout_seqs_cut', 0)}"
                )
        x = train_rows[0]["runs"][0]
        lines.append(
            f"MFU: model FLOPs = k*N*T + 2k*L*d*sum(s^2), N = {x['n_layer_params'] / 1e6:.2f}M "
            f"transformer-layer params of {MODEL} (k=6 full, 4 LoRA), L = {x['layers']}, d = {x['hidden']}; "
            f"/ step seconds / GEMM peak of the dtype used."
        )
    for r in rows:
        if r["key"] == "probe":
            x = r["runs"][0]
            lines.append(f"probe (in-process, fp32 full fine-tuning, up to 6 batches of {BATCH} pairs per kind):")
            for kind in ("random", "grouped"):
                lines.append(
                    f"  {kind:8s} batches ({100 * x[f'{kind}_pad_frac']:.0f}% padding): pad+fwd+bwd "
                    f"fp32 {x[f'{kind}_fp32_fwdbwd_s_per_step']:.2f} s/step "
                    f"({x[f'{kind}_fp32_real_tokens_per_s']:.0f} real tok/s), bf16 autocast "
                    f"{x[f'{kind}_bf16ac_fwdbwd_s_per_step']:.2f} s/step "
                    f"({x[f'{kind}_bf16ac_real_tokens_per_s']:.0f} real tok/s)"
                )
            lines.append(
                f"  pad_batch {1000 * x['pad_batch_s']:.1f} ms; clip + AdamW step "
                f"{1000 * x['clip_adamw_s']:.0f} ms over {x['params_total'] / 1e6:.1f}M params "
                f"({x['params_embeddings'] / 1e6:.1f}M of them embeddings)"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each training variant")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=512, help="total tokens per sequence, both trainers")
    ap.add_argument("--file", type=Path, default=HH)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="minilm", help="the reward backbone")
    ap.add_argument("--only", default=DEFAULT, help="comma-separated subset of " + ",".join(NAMES))
    ap.add_argument("--save", type=Path, help="append each variant's result to this JSON-lines file")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the variants (and GEMM peak) already in --save for the same sizes; the last one wins",
    )
    a = ap.parse_args()
    global MODEL
    MODEL = FAMILIES[a.family]
    if not a.file.exists():
        print(f"skip: {a.file} is absent (../shared/data not beside the project)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if a.variant:
        child(a.variant, a.reps, a)
        return 0
    common = [
        "--file",
        str(a.file),
        "--pairs",
        str(a.pairs),
        "--heldout",
        str(a.heldout),
        "--max-length",
        str(a.max_length),
        "--family",
        a.family,
    ]
    saved = {}
    if a.save and a.resume and a.save.exists():
        for line in a.save.read_text().splitlines():
            r = json.loads(line)
            if (r.get("pairs"), r.get("heldout"), r.get("max_length"), r.get("family", "minilm")) == (
                a.pairs,
                a.heldout,
                a.max_length,
                a.family,
            ):
                saved[r["key"]] = r
    rows = []
    for v in ["peak", *[v for v in a.only.split(",") if v and v != "peak"]]:
        if v not in NAMES:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(NAMES)}")
        if v in saved:
            rows.append(saved[v])
            continue
        reps = 5 if v == "peak" else (1 if v == "probe" else a.reps)
        if v == "trl_bf16" and rows and rows[0].get("peak_bf16_flops", 0) < rows[0].get("peak_fp32_flops", 0):
            print(
                f"  skipped {NAMES[v]}: this CPU's bf16 matmul ({rows[0]['peak_bf16_flops'] / 1e9:.1f} GFLOP/s) is slower "
                f"than fp32 ({rows[0]['peak_fp32_flops'] / 1e9:.0f} GFLOP/s): no native bf16",
                file=sys.stderr,
                flush=True,
            )
            continue
        try:
            r = run_variant(Path(__file__), v, *common, reps=reps)
        except subprocess.CalledProcessError as e:
            print(f"variant {v} failed:\n{e.stderr[-4000:]}", file=sys.stderr)
            return 1
        rows.append(
            {
                "key": v,
                "variant": NAMES[v],
                "reps": reps,
                "pairs": a.pairs,
                "heldout": a.heldout,
                "max_length": a.max_length,
                "family": a.family,
                **r,
            }
        )
        if a.save:
            a.save.parent.mkdir(parents=True, exist_ok=True)
            with a.save.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        print(f"  done: {NAMES[v]}", file=sys.stderr, flush=True)
    print(report(rows[1:], rows[0], a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
