"""One typed configuration for every mars_ray stage.

The root :class:`Config` is a tree of small dataclasses, one per concern. Values come
from three layers, later ones winning::

    defaults  <  --config FILE.yaml  <  dotted overrides (--mars.tau 0.5, --train.lr=2e-5)

Every key is a dotted path (``mars.tau``). Unknown keys are errors with a "did you mean"
hint; values are type-checked and never silently changed; cross-field rules live in one
place, :meth:`Config.validate`. Each stage receives only its own sub-config.

This module imports only the standard library and PyYAML so it is cheap to import from
the CLI, from Ray workers and from tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

CONFIG_FILENAME = "config.yaml"


# --------------------------------------------------------------------------------------
# Sections. Each field's help text is its comment; `mars-ray config show` prints values.
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    # File path (jsonl/json/csv/parquet), a Hugging Face dataset id, or "builtin:demo".
    path: str = "builtin:demo"
    # Reader: auto-detected from the fields when "auto". TRL's four preference layouts all read:
    # "pairs" (explicit prompt string), "hh-rlhf" (implicit prompt: two full texts, split after the
    # last shared "\n\nAssistant:" or, for plain texts, at the last shared word), "conversational"
    # (message lists, with or without a "prompt" list). "rewardbench2" (lists of completions per
    # prompt, best-of-N) is read by `mars-ray eval` only.
    format: Literal[
        "auto",
        "pairs",
        "hh-rlhf",
        "conversational",
        "pku-saferlhf",
        "ultrafeedback",
        "rewardbench",
        "rewardbench2",
        "generic",
    ] = "auto"
    # Generic format: our field name -> column in the file (keys: prompt, chosen, rejected, subset, margin).
    columns: dict[str, str] = field(default_factory=dict)
    # PKU-SafeRLHF native rows: follow the helpfulness ("better") or the safety ("safer") label.
    pku_label: Literal["better", "safer"] = "safer"
    # Hugging Face datasets only: split and config name.
    hf_split: str = "train"
    hf_name: str | None = None
    # Keep at most this many pairs (deterministic under `seed`); null keeps all.
    max_pairs: int | None = None
    # Seed of the subset and the splits (null: the run's seed). Fix it to compare seeds of training
    # on one subset (the paper's setting: the same 1,000 pairs for every method and seed).
    seed: int | None = None
    # Held-out fractions; the rest is train. Splits depend only on data + seed, never on method.
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # Keep all pairs of one prompt in the same split ("prompt") or split pair by pair ("pair").
    split_by: Literal["prompt", "pair"] = "prompt"
    # Token limits: prompts are truncated from the left, responses capped; no pair is dropped.
    max_prompt_tokens: int = 512
    max_response_tokens: int = 192
    # Tokenizer for length statistics and limits; null uses model.reward.
    tokenizer: str | None = None
    # Stop with an error when more than this fraction of rows is quarantined (wrong format?).
    max_bad_fraction: float = 0.5
    # Keep rows whose chosen == rejected (flagged) instead of quarantining them.
    keep_identical: bool = False


@dataclass
class ModelConfig:
    # Reward-model backbone: hub id, local path, or builtin:minilm.
    reward: str = "builtin:minilm"
    # Sentence encoder for semantic distances.
    encoder: str = "builtin:minilm"
    # Where converted built-in models and generation caches live; null: $MARS_RAY_CACHE or ~/.cache/mars_ray.
    cache_dir: str | None = None
    # How the generation cache in cache_dir is kept: "sqlite" (one file; local disks), "shards"
    # (one append-only file per writing process, merged on read: safe on NFS/EFS/Lustre shared by
    # several nodes), "auto" (shards on a network file system, else sqlite). The first run decides
    # and records it in cache_dir/cache_backend; sqlite on a network file system is refused.
    cache_backend: Literal["auto", "sqlite", "shards"] = "auto"
    # Weights dtype of reward models loaded for inference (scoring, evaluation, serving) and of the
    # semantic encoder: "auto" is bfloat16 where bf16 is native (a CUDA GPU of compute capability
    # >= 8, or a CPU with AMX, AVX512-BF16 or Arm BF16), else float32. The reward head always
    # computes in float32 (mars_ray/models/precision.py). Training follows train.precision.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Never touch the hub (also implied by HF_HUB_OFFLINE=1); null: from the environment.
    offline: bool | None = None


@dataclass
class MarsConfig:
    # What differs per method.
    strategy: Literal["mars", "mars-nosem", "uniform", "none", "west-of-n", "adaboost"] = "mars"
    # Allocation q = softmax(-tau * margin): "signed" (v2), "abs" (v1: |margin|), "uniform".
    allocation: Literal["signed", "abs", "uniform"] = "signed"
    # Temperature of the allocation; tau -> 0 is uniform.
    tau: float = 0.5
    # Margins as they are ("raw", the papers) or divided by their std ("std": q ∝ exp(-τ·Δ/σ_Δ), so
    # tau means the same for a fresh score head, σ ≈ 0.01, and a trained model, σ ≈ 1). Default
    # "std": at the embedded scale the margins after one pass have σ ≈ 0.3, where raw τ = 0.5 is
    # uniform to within a few percent (jobs/paper/*.yaml set "raw").
    margin_scale: Literal["raw", "std"] = "std"
    # r^0: the backbone with a fresh score head (0, the papers' default reading) or that backbone
    # trained this many passes on the human pairs before the first allocation (an "off-the-shelf"
    # reward model; informative margins from epoch 1). Built once per (data, backbone, training
    # settings, seed) and shared by every strategy of that seed through model.cache_dir. Default 1:
    # a fresh head's margins are noise, so epoch 1 would allocate at random (jobs/paper: 0).
    warmup_passes: int = 1
    # Margins of the next epoch's allocation scored inside the training run that produced r^t (its
    # workers hold the model already: no model load, no scoring pool per epoch); false: a Ray Data
    # scoring pool (resources.actors, resources.gpus_per_actor) scores them before the allocation.
    margins_in_training: bool = True
    # Synthetic pairs added per epoch. The default keeps the embedded demo to minutes on 2 CPU
    # cores; the paper used 5 synthetic pairs per original pair.
    budget: int = 16
    # Outer MARS epochs T. The default, 1 (after the warm-up r^0), keeps the embedded demo under
    # 5 minutes on 2 CPU cores: each epoch is a generation stage and a training run.
    epochs: int = 1
    # West-of-N: responses generated per prompt (each group of N yields one best-vs-worst pair),
    # sampled at this temperature with the paraphrase section's generator.
    west_of_n: int = 4
    west_of_n_temperature: float = 0.8
    # AdaBoost-style weights w ∝ exp(-beta * margin).
    adaboost_beta: float = 1.0


@dataclass
class AugmentConfig:
    # `mars-ray augment`: which MARS epoch this is (lineage; epoch 1 scores with the base model).
    epoch: int = 1
    # Fail the epoch (a clear error, nothing recorded as done) when more than this share of an
    # operation's generations fail (endpoint errors after retries, budget exhausted, a crashed
    # chunk): a broken generator must not silently turn a `mars` run into a run without synthetic data.
    max_failure_rate: float = 0.2


# The built-in rewriter (SmolLM2-135M-Instruct): the semantic step is off with it unless asked for.
BUILTIN_REWRITER = "builtin:smollm2"


@dataclass
class SemanticConfig:
    # Rewrite semantically-too-close pairs (the mars-nosem ablation never does). null (auto): on,
    # except with the built-in rewriter builtin:smollm2, whose rewrites fail the quality figure in
    # docs/results.md (the run says so); true turns it on with any rewriter.
    enabled: bool | None = None

    def active(self, rewrite_model: str) -> bool:
        """Whether the semantic step runs with this rewriter (``enabled``, or auto as above)."""
        if self.enabled is not None:
            return bool(self.enabled)
        return str(rewrite_model).strip() != BUILTIN_REWRITER

    # Distance threshold; null uses the dataset mean distance (the paper).
    threshold: float | None = None
    batch_size: int = 64


# Generation rows per batch on a GPU actor with batch_size "auto": a decoding step on a GPU costs
# about the same for 1 row as for a few hundred with a <= 8B model (it is bound by reading the
# weights), so large batches amortise it; lower it for long outputs on a small GPU.
GENERATION_BATCH_AUTO = 128


@dataclass
class EndpointConfig:
    """Settings of a text generator, shared by the rewrite and paraphrase sections."""

    # "local": a chat model through transformers; "seq2seq": T5-style (paraphrase only);
    # "openai": any OpenAI-compatible endpoint (GPT-4.1, vLLM, llama.cpp, `mars-ray llm-server`).
    backend: Literal["local", "seq2seq", "openai"] = "local"
    model: str = "builtin:smollm2"
    # OpenAI-compatible endpoint; the key is read from the environment variable named here.
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # Endpoint etiquette: parallel requests, per-request timeout, retries with backoff (by the
    # openai client), and per-actor budgets of requests and tokens (null: unlimited).
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 4
    max_requests: int | None = None
    max_tokens: int | None = None
    max_new_tokens: int = 160
    temperature: float = 0.0
    # Seed of sampled generations. Not the run's seed: a sampled candidate is keyed on its text and
    # index in the generation cache (the bank), so every epoch, strategy, seed and trial shares it.
    gen_seed: int = 0
    # Requests per Ray Data batch and per local generate call. On a CPU a decoding step reads all
    # the weights whatever the rows, so big batches cost little more than small ones.
    # "auto" follows the device: GENERATION_BATCH_AUTO rows on GPU actors (resources.gpus_per_actor
    # > 0), 32 on CPU actors. The openai back end takes at least `concurrency` rows per batch, so
    # one batch keeps that many requests in flight (an actor sends one batch at a time).
    batch_size: int | Literal["auto"] = 32

    def batch(self, gpus_per_actor: float) -> int:
        """``batch_size`` as a number for actors with ``gpus_per_actor`` GPUs each."""
        if self.batch_size == "auto":
            n = GENERATION_BATCH_AUTO if float(gpus_per_actor) > 0 else 32
        else:
            n = int(self.batch_size)
        return max(n, int(self.concurrency)) if self.backend == "openai" else n

    # Weights of a local generator: auto = bfloat16 where the hardware has native bf16 matmuls (a
    # CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class RewriteConfig(EndpointConfig):
    # Rewrite attempts per pair: the rejected response first, then the chosen one. The paper used
    # 5 and 5 with GPT-4-class rewriters; 2 and 2 keep the embedded CPU demo to minutes (each
    # attempt is a sampled generation of up to twice the response's length).
    max_attempts_rejected: int = 2
    max_attempts_chosen: int = 2
    # Attempts per generation call: sequential (one, the paper's protocol), by_role (all of the
    # rejected, then all of the chosen) or all (both roles at once); candidates are judged in
    # protocol order, so the outcome is the same. null: all for local models (extra rows in a
    # batch are nearly free), sequential for openai (each attempt is a paid request).
    schedule: Literal["sequential", "by_role", "all"] | None = None
    # Label check (v2 §3.2): keep a rewrite only if the pair is still a valid preference, i.e. the
    # scoring model r^{t-1} still scores the chosen side higher ("reward"), or never ("none").
    # "auto": "reward" unless r^{t-1} is an untrained score head (epoch 1 without
    # mars.warmup_passes), whose verdict would be a coin flip.
    label_check: Literal["auto", "reward", "none"] = "auto"
    # false: no rewrite gate (every non-blank output is a candidate): for a generator whose output
    # is known to be clean, or tests with random tiny models. The audit counts outputs either way.
    gate: bool = True
    # The rewrite gate (core.filters.rewrite_rejection), before the distance and label checks: the
    # reply must sit between <reply> markers (when the template asks for them), must not echo
    # the template or a transcript label, loop, stop mid-sentence, or fall outside these length
    # ratios of the text it rewrites, and (when set) must be at least this similar (MiniLM cosine)
    # to the conversation's last human turn.
    min_length_ratio: float = 0.2
    max_length_ratio: float = 2.5
    # 0.0: below the 2nd percentile of real replies in HH-RLHF helpful (-0.003 over 2,000 chosen and
    # rejected replies; PKU-SafeRLHF 0.155, UltraFeedback 0.061): human replies such as "You're
    # welcome" are far from their question, so a higher floor would reject real replies. null: off.
    min_topic_similarity: float | None = 0.0
    max_new_tokens: int = 192
    # Sampling, so repeated attempts differ.
    temperature: float = 0.7


@dataclass
class ParaphraseConfig(EndpointConfig):
    # Deterministic decoding (temperature 0) with n-gram blocking: greedy for one paraphrase, beam
    # search with num_beams = max(num_beams, n) for n (the paper: beams with a T5 paraphraser).
    num_beams: int = 1
    no_repeat_ngram_size: int = 3
    # Quality gate on every paraphrase.
    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.0
    max_copy_similarity: float = 0.95
    min_semantic_similarity: float = 0.7
    # A text whose paraphrases failed the gate is resampled in the same actor (temperature
    # topup_temperature, a new seed per round) up to retry_rounds times: no new stage, no reload.
    # Each round samples retry_oversample candidates per missing paraphrase in one call and keeps
    # the first that pass (SmolLM2 on demo texts: ~1 in 3 samples at 0.8 passes the gate).
    retry_rounds: int = 1
    retry_oversample: int = 3
    # A reserve paraphrased in the first round: the rejected response of the ceil(reserve x budget)
    # pairs without budget that have the largest allocation weight. When the gate leaves some
    # pools short, the shortfall moves to them (by descending weight) without another round.
    reserve: float = 0.5
    # When the pools are still too small for the budget: stage-level rounds of extra sampled
    # paraphrases for the pairs with the largest allocation weight.
    topup_rounds: int = 2
    topup_temperature: float = 0.8


@dataclass
class TrainConfig:
    # 5e-4 moves a LoRA-adapted MiniLM in one pass over a few hundred pairs (the embedded default:
    # test accuracy 0.33 -> 0.97); the paper's 2e-5 (jobs/paper/*.yaml) leaves it at ln 2 there.
    lr: float = 5e-4
    batch_size: int = 8
    # Passes over D^t per MARS epoch.
    passes: int = 1
    max_steps: int | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_accum: int = 1
    # LoRA through peft (paper: r=16, alpha=32; the score head is trained in full).
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Train the backbone without dropout (TRL's RewardTrainer default; LoRA keeps lora_dropout);
    # dropout also makes a CPU step markedly slower.
    disable_dropout: bool = True
    # Subtract each pair's label margin (the data's optional "margin" column, as in TRL and
    # OpenRLHF; synthetic pairs inherit their source pair's) inside the Bradley-Terry sigmoid:
    # -log σ(r+ − r− − m). Pairs without one use 0.
    margin_term: bool = False
    # TRL's center_rewards_coefficient: add this times mean((r+ + r−)²) to the loss, which keeps
    # rewards near zero (0: off; TRL suggests 0.01).
    center_rewards: float = 0.0
    # Loss weight of a synthetic pair relative to a human pair (1: the same). Combined with any
    # other per-pair weight (AdaBoost's), then scaled to mean 1 over the training set as every loss
    # weight is, so down-weighting the synthetic pairs raises the human pairs' share of each step
    # while the average step size stays.
    synthetic_weight: float = 1.0
    # Passes over D^t in each MARS epoch, one number per epoch (empty: train.passes every epoch);
    # e.g. [6, 11] gives `none` as many optimiser steps as `uniform` at 5 synthetic pairs per human
    # pair over two epochs.
    passes_per_epoch: list[int] = field(default_factory=list)
    # Batches of similar length (less padding): shuffled order cut into windows of this many
    # batches, each sorted by length, batch order shuffled again. 1: plain random batches.
    length_group: int = 32
    # "auto": mixed precision where bf16 is native (a CUDA GPU of compute capability >= 8, a CPU
    # with AMX, AVX512-BF16 or Arm BF16): fp32 weights, gradients and optimizer state, forward and
    # backward matrix multiplies in bf16 (torch.autocast; DeepSpeed: its bf16 section), the reward
    # head and the loss in fp32; fp32 elsewhere. "fp32" and "bf16" force one. The run's metrics,
    # summary and model card say which ran and why.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_workers: int = 1
    use_gpu: bool = False
    # torch.distributed backend of the training workers: "auto" is NCCL when the workers hold GPUs
    # and run on them, gloo otherwise (also when resources.device is cpu, e.g. on a simulated GPU
    # cluster whose nodes advertise GPUs they do not have).
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # CPUs (and torch threads) per training worker; null: reserve 1, use the cluster's CPUs /
    # num_workers as threads (max 8).
    cpus_per_worker: float | None = None
    # Torch threads per worker (null: train.cpus_per_worker rounded, or the share above). Set it
    # when a worker reserves less than it may use, e.g. 0.99 CPU inside a Tune trial whose own
    # process sits idle while the worker trains.
    threads: int | None = None
    # Worker-group restarts from the last checkpoint when a worker dies (Ray Train FailureConfig).
    max_failures: int = 2
    # Also checkpoint every this many optimizer steps inside a pass (null: at the end of each pass
    # only). A restart then continues the same batch order from the checkpoint's position instead
    # of redoing the pass; at the cluster budget a pass is tens of thousands of pairs.
    checkpoint_steps: int | None = None


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # Use torch's AdamW inside DeepSpeed (no fused-Adam compilation).
    torch_adam: bool = True
    # ZeRO-2/3: overlap the gradient reduction with the backward pass (extra communication
    # buffers). null: on when the workers train on GPUs (NCCL runs beside the kernels), off on CPUs
    # (gloo shares the cores the backward pass uses).
    overlap_comm: bool | None = None


@dataclass
class TuneConfig:
    # Grid values or ranges per dotted key, e.g. {"mars.tau": [0.1, 0.5, 1.0]}.
    space: dict[str, list[Any]] = field(default_factory=dict)
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "asha"
    max_concurrent: int = 1
    trial_cpus: float = 0.01


@dataclass
class ServeConfig:
    """`mars-ray serve`: a Ray Serve deployment of a reward model (see mars_ray/serve)."""

    # HTTP proxy address: loopback unless told otherwise (0.0.0.0 exposes the model to the network).
    host: str = "127.0.0.1"
    port: int = 8000
    # Application name (DeploymentHandle look-up: serve.get_app_handle(name)) and its route prefix.
    app_name: str = "mars-reward"
    route_prefix: str = "/"
    # Fixed number of replicas; ignored when autoscaling is on (max_replicas set).
    num_replicas: int = 1
    # Autoscaling between min_replicas and max_replicas (null max_replicas: no autoscaling),
    # aiming at target_ongoing_requests per replica (null: max_batch_size).
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    # Requests a replica accepts at once (null: 2 x max_batch_size, so one batch can fill while
    # another runs); more wait in the proxy, which backs off while the replica is full. With a small
    # max_batch_size raise it: max_batch_size 1 on 2 CPU cores, 64 HTTP clients: 4.5 req/s with the
    # default 2 admitted, 14.1 with 64 (benchmarks/bench_serve.py).
    max_ongoing_requests: int | None = None
    # @serve.batch: requests per batch and how long the first one waits for company.
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    # Forward passes inside a batch: the batch's pairs are length-sorted, then cut into passes of
    # at most forward_batch_size sequences and forward_max_tokens padded token slots (null: no
    # slot limit), so a long request does not make every short one in its batch pad to its length.
    # 512 suits CPUs, where a forward pass is already efficient for one sequence and bigger
    # passes only add padding; on a GPU raise it (jobs/cluster/serve.yaml: 16384).
    forward_batch_size: int = 32
    forward_max_tokens: int | None = 512
    # End-to-end HTTP request timeout in the proxy (null: none).
    request_timeout_s: float | None = 60.0
    # Bearer token read from this environment variable (null: no auth). Never logged or echoed.
    auth_token_env: str | None = None
    # Serving on an address other machines can reach (not loopback) without a token is refused
    # unless this is true (a trusted network, or TLS and auth in a proxy in front).
    allow_unauthenticated: bool = False
    # Caps against abuse, far above real rollouts (a text beyond the model's context is truncated
    # by the training rule, a large request is scored in chunks): characters per text, items per
    # request, bytes per request body. Over a cap: 413 with the cap's name.
    max_text_chars: int = 1_000_000
    max_batch_items: int = 16384
    max_request_bytes: int = 256 * 1024 * 1024
    # Rewards as (r - mean) / std: norm_mean / norm_std when set, else the model's own statistics
    # (config.json mean/std: the human training pairs' rewards, written by mars-ray train), else
    # those recorded in the run directory (metrics.jsonl: val_*, else test_*).
    normalize: bool = False
    norm_mean: float | None = None
    norm_std: float | None = None
    # Resources per replica; torch threads per replica (null: max(1, num_cpus)).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int | None = None

    def problems(self) -> list[str]:
        """Range and cross-field problems of this section, each with how to fix it."""
        p: list[str] = []
        if not 1 <= self.port <= 65535:
            p.append(f"serve.port={self.port} must be in 1..65535")
        if not self.host:
            p.append("serve.host is empty: use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
        if not self.app_name:
            p.append("serve.app_name is empty")
        if not self.route_prefix.startswith("/"):
            p.append(f"serve.route_prefix={self.route_prefix!r} must start with '/'")
        for name in (
            "num_replicas",
            "max_batch_size",
            "forward_batch_size",
            "max_text_chars",
            "max_batch_items",
            "max_request_bytes",
        ):
            if getattr(self, name) < 1:
                p.append(f"serve.{name}={getattr(self, name)} must be >= 1")
        if self.forward_max_tokens is not None and self.forward_max_tokens < 1:
            p.append(f"serve.forward_max_tokens={self.forward_max_tokens} must be >= 1 (or null: no limit)")
        if self.batch_wait_timeout_s < 0:
            p.append(f"serve.batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0")
        if self.max_replicas is not None:
            lo = self.min_replicas if self.min_replicas is not None else 1
            if lo < 0 or self.max_replicas < max(1, lo):
                p.append(
                    f"serve.min_replicas={self.min_replicas} and serve.max_replicas={self.max_replicas}: "
                    "need 0 <= min_replicas <= max_replicas and max_replicas >= 1"
                )
        elif self.min_replicas is not None:
            p.append("serve.min_replicas needs serve.max_replicas (autoscaling); or set serve.num_replicas")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            p.append(f"serve.target_ongoing_requests={self.target_ongoing_requests} must be > 0")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            p.append(
                f"serve.max_ongoing_requests={self.max_ongoing_requests} is below serve.max_batch_size="
                f"{self.max_batch_size}: batches could never fill; raise it or leave it null"
            )
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            p.append(f"serve.request_timeout_s={self.request_timeout_s} must be > 0 (or null: no timeout)")
        if self.auth_token_env is not None and not self.auth_token_env.strip():
            p.append("serve.auth_token_env is empty: name an environment variable, or null for no auth")
        if (self.norm_mean is None) != (self.norm_std is None):
            p.append("serve.norm_mean and serve.norm_std go together: set both or neither")
        if self.norm_std is not None and not self.norm_std > 0:
            p.append(f"serve.norm_std={self.norm_std} must be > 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            p.append("serve.num_cpus and serve.num_gpus must be >= 0")
        if self.threads is not None and self.threads < 1:
            p.append(f"serve.threads={self.threads} must be >= 1 (or null: max(1, serve.num_cpus))")
        return p


@dataclass
class RLConfig:
    # The policy to align: a causal chat LM (builtin:smollm2, a local folder or a hub id).
    policy: str = "builtin:smollm2"
    # TRL engine: grpo (group-normalised advantages) or rloo (leave-one-out baseline); both use
    # PPO's clipped probability ratio (rl.clip) and a KL penalty to the reference policy (rl.kl_coef).
    algorithm: Literal["grpo", "rloo"] = "grpo"
    # Optimisation steps (each: rollouts for rl.prompts_per_step prompts per worker, rewards, update).
    steps: int = 2
    lr: float = 1e-5
    kl_coef: float = 0.02
    clip: float = 0.2
    # Completions sampled per prompt (the group whose rewards form the baseline).
    num_generations: int = 4
    prompts_per_step: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    # GRPO: rewards scaled by the std of their group ("group", TRL's default), of the whole batch
    # ("batch"), or not at all ("none"); RLOO: advantages normalised over the batch (TRL's default off).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    normalize_advantages: bool = False
    # Rollouts with vLLM (TRL's use_vllm): "colocate" runs it in the training workers, "server" calls
    # a `trl vllm-serve` process. GPU nodes with vLLM installed only.
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    # Prompts are left-truncated to this many tokens before generation.
    max_prompt_tokens: int = 256
    # Training prompts: the first N distinct prompts of the data's train split (null: all of them).
    num_prompts: int | None = 64
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Ray Train workers for the policy (DDP); CPUs per worker (null: an even share of the cluster).
    num_workers: int = 1
    cpus_per_worker: float | None = None
    use_gpu: bool = False
    max_failures: int = 1
    # A checkpoint (adapter, optimizer, RNG, trainer state) every N steps.
    save_steps: int = 1
    # The reward model: deployed with Ray Serve as serve.app_name (a run dir, a model folder, a hub
    # id; null: model.reward). rl.reward_url instead calls an already running reward server over
    # HTTP (`mars-ray serve`, OpenRLHF-compatible) and deploys nothing; rl.reward_deploy=false uses
    # the Serve app serve.app_name already running on the cluster.
    reward_model: str | None = None
    reward_url: str | None = None
    reward_token_env: str | None = None
    reward_deploy: bool = True
    # How a deployed app is called from the policy workers: its DeploymentHandle or HTTP.
    reward_transport: Literal["handle", "http"] = "handle"
    # `mars-ray align-compare`: one policy per reward model (run dirs, folders or hub ids).
    reward_models: list[str] = field(default_factory=list)
    # Win-rates: prompts from data.path's test split (or rl.eval_path), responses per policy.
    eval_path: str | None = None
    eval_prompts: int = 32
    eval_max_new_tokens: int = 64
    # Judge: a local model ("local") or an OpenAI-compatible endpoint ("openai", e.g. GPT-4.1,
    # vLLM). judge_mode "logits" (local only) compares the judge's next-token probabilities of
    # "A" and "B"; "text" asks for a verdict and parses it.
    judge_backend: Literal["local", "openai"] = "local"
    judge_model: str = "builtin:smollm2"
    judge_base_url: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_mode: Literal["logits", "text"] = "logits"
    judge_max_new_tokens: int = 8
    judge_concurrency: int = 4
    judge_timeout_s: float = 60.0
    judge_max_retries: int = 4
    # A single-order verdict whose |log p(A) - log p(B)| is below this is a tie (logits mode).
    tie_margin: float = 0.0
    judge_batch_size: int = 8

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.steps < 1:
            p.append(f"rl.steps={self.steps} must be >= 1")
        if not self.lr > 0:
            p.append(f"rl.lr={self.lr} must be > 0")
        if self.kl_coef < 0:
            p.append(f"rl.kl_coef={self.kl_coef} must be >= 0 (0: no reference policy)")
        if not self.clip > 0:
            p.append(f"rl.clip={self.clip} must be > 0 (the paper: 0.2)")
        if self.num_generations < 2:
            p.append(
                f"rl.num_generations={self.num_generations} must be >= 2 (the group baseline needs two completions)"
            )
        if self.use_vllm and not self.use_gpu:
            p.append("rl.use_vllm needs rl.use_gpu true: vLLM generates on GPUs (set rl.use_vllm false on CPUs)")
        for name in (
            "prompts_per_step",
            "max_new_tokens",
            "max_prompt_tokens",
            "eval_prompts",
            "eval_max_new_tokens",
            "judge_max_new_tokens",
            "judge_concurrency",
            "save_steps",
            "judge_batch_size",
            "lora_r",
            "lora_alpha",
        ):
            if getattr(self, name) < 1:
                p.append(f"rl.{name}={getattr(self, name)} must be >= 1")
        if self.num_prompts is not None and self.num_prompts < 1:
            p.append(f"rl.num_prompts={self.num_prompts} must be >= 1 (or null: every train prompt)")
        if not self.temperature > 0:
            p.append(f"rl.temperature={self.temperature} must be > 0 (the group needs different completions)")
        if self.num_workers < 1:
            p.append(f"rl.num_workers={self.num_workers} must be >= 1 (the policy trains on Ray Train workers)")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            p.append(f"rl.cpus_per_worker={self.cpus_per_worker} must be > 0 (or null)")
        if self.max_failures < 0:
            p.append(f"rl.max_failures={self.max_failures} must be >= 0")
        if self.lora and not self.lora_target_modules:
            p.append("rl.lora_target_modules is empty: name the linear layers to adapt, e.g. [q_proj, v_proj]")
        if self.judge_mode == "logits" and self.judge_backend != "local":
            p.append(
                "rl.judge_mode=logits needs rl.judge_backend=local (an endpoint answers in text: use rl.judge_mode=text)"
            )
        if self.judge_backend == "openai" and not self.judge_base_url and not os.environ.get(self.judge_api_key_env):
            p.append(
                f"rl.judge_backend=openai needs rl.judge_base_url (an OpenAI-compatible server) or the "
                f"environment variable {self.judge_api_key_env} for api.openai.com"
            )
        if self.tie_margin < 0:
            p.append(f"rl.tie_margin={self.tie_margin} must be >= 0")
        if self.judge_timeout_s <= 0 or self.judge_max_retries < 0:
            p.append("rl.judge_timeout_s must be > 0 and rl.judge_max_retries >= 0")
        if self.reward_url is not None and not self.reward_url.startswith(("http://", "https://")):
            p.append(f"rl.reward_url={self.reward_url!r} must be an http(s):// URL of a reward server")
        return p


@dataclass
class ResourcesConfig:
    # Ray cluster address ("auto", "ray://host:10001"); null starts/joins a local Ray
    # (a job started with `ray job submit` joins its cluster automatically).
    ray_address: str | None = None
    # CPUs for a local Ray started by mars-ray (null: all).
    num_cpus: int | None = None
    # Ray Data actor pools (scoring, embedding, generation).
    actors: int = 1
    # Where models load: "auto" (the GPU Ray assigned to the actor or worker, else the CPU), "cpu",
    # "cuda" or "cuda:N" (mars_ray.runtime.pick_device; exported to Ray workers as MARS_RAY_DEVICE).
    device: str = "auto"
    # Run the data stages in the driver process, one actor object per stage reused across epochs,
    # instead of Ray Data actor pools (tiny data and debugging: no actor start-up).
    in_process: bool = False
    # In-process stage actors kept for reuse (least recently used dropped first, with the models
    # they hold): a West-of-N run or a paraphrase top-up round builds one with other arguments
    # every epoch or round, which would otherwise all stay in memory.
    in_process_keep: int = 2
    # CPUs (and torch threads) per stage actor; null: reserve 1, use the cluster's CPUs / actors as
    # threads (max 8).
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 0.0
    batch_size: int = 32


@dataclass
class BankConfig:
    # The generation bank (`mars-ray bank build`, and `compare` before its trials): paraphrase
    # candidates of every training response and rewrite attempts of every low-distance pair,
    # generated once into the generation cache (model.cache_dir) and shared by every epoch,
    # strategy, seed and trial. Demand beyond it is generated on the first miss and reported.
    # Gated paraphrases per response; null: what uniform allocation needs at this budget,
    # ceil(budget / pairs / 2), plus one.
    paraphrases: int | None = None
    # Also generate the rewrite attempts of the low-distance pairs (the semantic step's inputs).
    rewrites: bool = True
    # `compare`: build the bank once before the trials.
    before_compare: bool = True
    # Actors of the bank's generation and embedding pools (null: resources.actors). A compare on
    # a cluster runs one GPU per trial (resources.actors 1) but builds its bank before the trials,
    # when every GPU is free: set it to the cluster's GPUs (with resources.gpus_per_actor 1).
    actors: int | None = None


@dataclass
class CompareConfig:
    # `mars-ray compare`: every strategy x seed is one full `mars-ray train` (a Ray Tune trial).
    strategies: list[str] = field(default_factory=lambda: ["none", "uniform", "mars", "mars-nosem"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Extra held-out files every final model is evaluated on (e.g. a RewardBench-style file).
    eval_paths: list[str] = field(default_factory=list)
    # Leave each trial's own pairs (train, val and test: its data/pairs.parquet) out of the held-out
    # files, so "the rest of the training file" is a fair held-out set.
    exclude_training: bool = True
    # Pairs drawn from each held-out file (null: all; drawn before the trial's own pairs are removed).
    eval_max_pairs: int | None = None
    max_concurrent: int = 1


@dataclass
class EvalConfig:
    # `mars-ray eval`: scoring batch (sequences), equal-count |margin| bins of the curvature
    # diagnostic, and the token-length bucket edges for accuracy by length.
    batch_size: int = 32
    curvature_bins: int = 5
    length_edges: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    # Pairs to leave out (by pair id): a run directory (its data/pairs.parquet) or a parquet file
    # with a pair_id column, e.g. to evaluate on the rest of the file a run was trained on.
    exclude_pairs: str | None = None


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    # Refuse to write into a non-empty directory unless set.
    overwrite: bool = False
    # Keep Ray Train's checkpoints (each training run's model, optimizer and RNG states, under
    # ray_train/) after the run has finished. Default: deleted once model/ is written (they hold
    # the optimizer state too: several times the model per run); a run cut off keeps them for
    # --resume either way.
    keep_checkpoints: bool = False


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mars: MarsConfig = field(default_factory=MarsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    paraphrase: ParaphraseConfig = field(default_factory=ParaphraseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        """Build a config from a nested mapping (e.g. parsed YAML) over the defaults.

        Raises:
            ValueError: an unknown key (with a "did you mean" hint) or a value of the wrong type.
        """
        cfg = cls()
        for key, value in _translate_legacy(_flatten(data, source=source), source).items():
            cfg.set(key, value, source=source)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """defaults < YAML file at ``path`` < ``overrides`` (dotted key -> value), validated.

        Raises:
            ValueError: unreadable file, unknown key, bad value, or a failed cross-field check.
        """
        cfg = cls()
        if path is not None:
            cfg = cls.from_dict(read_yaml(path), source=str(path))
        for key, value in (overrides or {}).items():
            cfg.set(key, value, source="command line", from_text=isinstance(value, str))
        return cfg.validate()

    def set(self, key: str, value: Any, *, source: str = "config", from_text: bool = False) -> None:
        """Set a dotted key. With ``from_text`` the value is a command-line string parsed as YAML.

        Raises:
            ValueError: unknown key or a value that does not fit the field's type.
        """
        if key in _LEGACY_KEYS:
            if from_text:
                value = _parse_text(value, bool)
            key, value = "train.precision", _legacy_precision(key, _check_type(value, bool, f"{key} (from {source})"))
        owner, name, hint = _locate(self, key)
        if from_text:
            value = _parse_text(value, hint)
        setattr(owner, name, _check_type(value, hint, f"{key} (from {source})"))

    def get(self, key: str) -> Any:
        owner, name, _ = _locate(self, key)
        return getattr(owner, name)

    def copy(self, overrides: dict[str, Any] | None = None, *, source: str = "copy") -> Config:
        """An independent copy (nested sections and lists not shared), with dotted ``overrides``
        set on it; not validated again (call :meth:`validate` if the overrides may break a rule).

        Raises:
            ValueError: an unknown key or a value of the wrong type in ``overrides``.
        """
        out = Config.from_dict(self.to_dict(), source=source)
        for key, value in (overrides or {}).items():
            out.set(key, value, source=source)
        return out

    # ---------------------------------------------------------------- checks
    def validate(self) -> Config:
        """Check every field's type and the cross-field rules; return self.

        Raises:
            ValueError: listing every problem found, each with how to fix it.
        """
        problems: list[str] = []
        for key, hint, value in _walk(self):
            try:
                _check_type(value, hint, key)
            except ValueError as e:
                problems.append(str(e))
        problems += _cross_field_problems(self)
        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def hash(self) -> str:
        """Short stable hash of the resolved values (for run ids, caches, /health)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the resolved config as ``directory/config.yaml`` (runnable with --config)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / CONFIG_FILENAME
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(self.to_yaml(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def keys() -> list[str]:
    """Every dotted key the config knows, in declaration order."""
    return [k for k, _, _ in _walk(Config())]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, except that ``1e-3`` / ``2E5`` are numbers (YAML 1.1 reads them as
    strings, which would make ``--train.lr 1e-3`` a type error)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping.

    Raises:
        ValueError: missing/unreadable file, invalid YAML, or a top level that is not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read config file: {e}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------

_LEAF_DICT_KEYS = {"data.columns", "tune.space"}

# Keys an older mars_ray knew (a run directory's config.yaml may hold them): both became
# train.precision. Read as the precision they ran in (true: bf16, false: fp32), with a warning.
_LEGACY_KEYS = ("train.bf16_autocast", "deepspeed.bf16")


def _legacy_precision(key: str, value: bool) -> str:
    precision = "bf16" if value else "fp32"
    warnings.warn(
        f"{key} was replaced by train.precision (auto|fp32|bf16); {key}={str(value).lower()} is read as "
        f"train.precision={precision}. Write train.precision instead (auto picks bf16 where it is native)",
        FutureWarning,
        stacklevel=3,
    )
    return precision


def _translate_legacy(flat: dict[str, Any], source: str) -> dict[str, Any]:
    """A file's legacy precision keys as train.precision: what the old keys made the run use
    (DeepSpeed runs followed deepspeed.bf16, the others train.bf16_autocast)."""
    found = {k: flat.pop(k) for k in _LEGACY_KEYS if k in flat}
    if not found or "train.precision" in flat:
        return flat
    key = "deepspeed.bf16" if flat.get("deepspeed.enabled") is True else "train.bf16_autocast"
    value = found.get(key, False)
    flat["train.precision"] = _legacy_precision(f"{key} (from {source})", _check_type(value, bool, key))
    return flat


def _flatten(data: dict[str, Any], *, source: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _LEAF_DICT_KEYS:
            if not v:
                continue
            out.update(_flatten(v, source=source, prefix=key + "."))
        else:
            out[key] = v
    return out


def _locate(cfg: Config, key: str) -> tuple[Any, str, Any]:
    """Return (owning dataclass, field name, type hint) for a dotted key."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(type(obj))
        if part not in hints:
            prefix = ".".join(parts[:i])
            known = [f"{prefix}.{h}" if prefix else h for h in hints]
            raise ValueError(_unknown_key_message(key, known))
        value = getattr(obj, part)
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(value):
            if last:
                raise ValueError(
                    f"{key} is a section; set one of its keys, e.g. {key}.{next(iter(typing.get_type_hints(type(value))))}"
                )
            obj = value
            continue
        if not last:
            raise ValueError(_unknown_key_message(key, keys()))
        return obj, part, hints[part]
    raise ValueError(f"empty config key {key!r}")  # pragma: no cover


def _unknown_key_message(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, keys(), n=3, cutoff=0.6) or difflib.get_close_matches(
        key, candidates, n=3, cutoff=0.5
    )
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `mars-ray config show` lists every key"
    return f"unknown config key {key!r}{hint}"


def _walk(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".")
        else:
            yield key, typing.get_type_hints(type(obj))[f.name], value


def _parse_text(text: str, hint: Any) -> Any:
    """Parse a command-line string: YAML scalars/lists for typed fields, raw text for str fields."""
    if _accepts_str(hint):
        parsed = _yaml_load(text) if text.strip() else text
        # "null" on the command line clears an Optional[str]; everything else stays verbatim text.
        return None if parsed is None and _is_optional(hint) else text
    try:
        return _yaml_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse {text!r}: {e}") from None


def _is_optional(hint: Any) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    if _is_union(hint):
        return any(a is str for a in typing.get_args(hint))
    return False


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` if it fits ``hint`` (ints are accepted for floats), else raise."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if _is_union(hint):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _check_type(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        tip = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}: {value!r} is not one of {list(choices)}{tip}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(hint) or (Any, Any)
        return {_check_type(k, kt, where): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # pragma: no cover


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _cross_field_problems(cfg: Config) -> list[str]:
    """Rules that involve more than one field or a range; each message says how to fix it."""
    p: list[str] = []
    d, m = cfg.data, cfg.mars
    if not d.path:
        p.append("data.path is empty: give a file, a Hugging Face dataset id, or builtin:demo")
    if d.max_pairs is not None and d.max_pairs < 1:
        p.append(f"data.max_pairs={d.max_pairs} must be >= 1 (or null to keep all pairs)")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(d, name)
        if not 0.0 <= v < 1.0:
            p.append(f"data.{name}={v} must be in [0, 1)")
    if d.val_fraction + d.test_fraction >= 1.0:
        p.append(
            f"data.val_fraction + data.test_fraction = {d.val_fraction + d.test_fraction} leaves no "
            "training data; make their sum < 1"
        )
    if d.max_prompt_tokens < 1 or d.max_response_tokens < 1:
        p.append("data.max_prompt_tokens and data.max_response_tokens must be >= 1")
    if not 0.0 < d.max_bad_fraction <= 1.0:
        p.append(f"data.max_bad_fraction={d.max_bad_fraction} must be in (0, 1]")
    if d.format == "generic" and not {"prompt", "chosen", "rejected"} <= set(d.columns):
        p.append(
            "data.format=generic needs data.columns with prompt, chosen and rejected, e.g. "
            "--data.columns '{prompt: question, chosen: good, rejected: bad}'"
        )
    unknown_cols = set(d.columns) - {"prompt", "chosen", "rejected", "subset", "margin"}
    if unknown_cols:
        p.append(f"data.columns has unknown keys {sorted(unknown_cols)}; use prompt, chosen, rejected, subset, margin")
    if cfg.bank.paraphrases is not None and cfg.bank.paraphrases < 0:
        p.append(f"bank.paraphrases={cfg.bank.paraphrases} must be >= 0 (or null: from the budget)")
    if cfg.bank.actors is not None and cfg.bank.actors < 1:
        p.append(f"bank.actors={cfg.bank.actors} must be >= 1 (or null: resources.actors)")
    if m.warmup_passes < 0:
        p.append(f"mars.warmup_passes={m.warmup_passes} must be >= 0 (0: start from a fresh score head)")
    if not 0.0 <= cfg.augment.max_failure_rate <= 1.0:
        p.append(f"augment.max_failure_rate={cfg.augment.max_failure_rate} must be in [0, 1] (1: never fail)")
    if m.tau <= 0:
        p.append(
            f"mars.tau={m.tau} must be > 0 (small tau approaches uniform allocation; use mars.allocation=uniform for exactly uniform)"
        )
    if m.budget < 0:
        p.append(f"mars.budget={m.budget} must be >= 0")
    if m.epochs < 1:
        p.append(f"mars.epochs={m.epochs} must be >= 1")
    if cfg.augment.epoch < 1:
        p.append(f"augment.epoch={cfg.augment.epoch} must be >= 1")
    if cfg.train.length_group < 1:
        p.append(f"train.length_group={cfg.train.length_group} must be >= 1 (1: plain random batches)")
    for key in ("train.cpus_per_worker", "resources.cpus_per_actor"):
        v = cfg.get(key)
        if v is not None and v <= 0:
            p.append(f"{key}={v} must be > 0 (or null: an even share of the cluster's CPUs)")
    if cfg.train.threads is not None and cfg.train.threads < 1:
        p.append(f"train.threads={cfg.train.threads} must be >= 1 (or null)")
    if cfg.train.max_failures < 0:
        p.append(f"train.max_failures={cfg.train.max_failures} must be >= 0")
    if m.west_of_n_temperature <= 0:
        p.append(f"mars.west_of_n_temperature={m.west_of_n_temperature} must be > 0 (N sampled responses must differ)")
    if m.west_of_n < 2:
        p.append(f"mars.west_of_n={m.west_of_n} must be >= 2 (best and worst of N)")
    rw = cfg.rewrite
    if not 0 <= rw.min_length_ratio <= 1 <= rw.max_length_ratio:
        p.append("rewrite.min_length_ratio must be in [0, 1] and rewrite.max_length_ratio >= 1")
    if rw.min_topic_similarity is not None and not -1.0 <= rw.min_topic_similarity <= 1.0:
        p.append(f"rewrite.min_topic_similarity={rw.min_topic_similarity} must be in [-1, 1] (a cosine) or null")
    pp = cfg.paraphrase
    if not 0 < pp.min_length_ratio <= 1 <= pp.max_length_ratio:
        p.append("paraphrase.min_length_ratio must be in (0, 1] and paraphrase.max_length_ratio >= 1")
    for name in ("max_copy_similarity", "min_semantic_similarity"):
        if not 0.0 <= getattr(pp, name) <= 1.0:
            p.append(f"paraphrase.{name} must be in [0, 1]")
    if cfg.paraphrase.topup_rounds < 0 or cfg.paraphrase.retry_rounds < 0 or cfg.paraphrase.topup_temperature <= 0:
        p.append(
            "paraphrase.topup_rounds and paraphrase.retry_rounds must be >= 0 and paraphrase.topup_temperature > 0"
        )
    if cfg.paraphrase.reserve < 0:
        p.append(f"paraphrase.reserve={cfg.paraphrase.reserve} must be >= 0 (a share of the budget; 0: no reserve)")
    if cfg.paraphrase.retry_oversample < 1:
        p.append(f"paraphrase.retry_oversample={cfg.paraphrase.retry_oversample} must be >= 1")
    if cfg.rewrite.backend == "seq2seq":
        p.append("rewrite.backend=seq2seq is not supported (rewriting needs instructions): use local or openai")
    for section in (cfg.rewrite, cfg.paraphrase):
        sec = "rewrite" if section is cfg.rewrite else "paraphrase"
        if section.concurrency < 1 or section.max_retries < 0 or section.timeout_s <= 0:
            p.append(f"{sec}.concurrency must be >= 1, {sec}.max_retries >= 0 and {sec}.timeout_s > 0")
        if section.backend == "openai" and not section.base_url and not os.environ.get(section.api_key_env):
            p.append(
                f"{sec}.backend=openai needs {sec}.base_url (an OpenAI-compatible server) or the "
                f"environment variable {section.api_key_env} for api.openai.com"
            )
    t = cfg.train
    if t.lr <= 0:
        p.append(f"train.lr={t.lr} must be > 0")
    if t.checkpoint_steps is not None and t.checkpoint_steps < 1:
        p.append(f"train.checkpoint_steps={t.checkpoint_steps} must be >= 1 (or null: at the end of each pass)")
    if t.center_rewards < 0:
        p.append(f"train.center_rewards={t.center_rewards} must be >= 0 (0: off)")
    if t.batch_size < 1 or t.grad_accum < 1 or t.passes < 1:
        p.append("train.batch_size, train.grad_accum and train.passes must be >= 1")
    if not t.synthetic_weight > 0:
        p.append(f"train.synthetic_weight={t.synthetic_weight} must be > 0 (1: synthetic pairs weigh as human ones)")
    if t.passes_per_epoch and (len(t.passes_per_epoch) != m.epochs or min(t.passes_per_epoch) < 1):
        p.append(
            f"train.passes_per_epoch={t.passes_per_epoch} needs one number >= 1 per MARS epoch "
            f"(mars.epochs={m.epochs}), or [] for train.passes every epoch"
        )
    if t.num_workers < 0:
        p.append("train.num_workers must be >= 0 (0 runs the loop in the driver, for tests)")
    if cfg.deepspeed.enabled and t.num_workers < 1:
        p.append("deepspeed.enabled needs train.num_workers >= 1 (DeepSpeed runs on Ray Train workers)")
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        p.append("deepspeed.offload_params needs deepspeed.stage=3")
    p += cfg.rl.problems()
    p += cfg.serve.problems()  # the port range among them
    if cfg.resources.actors < 1:
        p.append("resources.actors must be >= 1")
    if cfg.resources.in_process_keep < 1:
        p.append(f"resources.in_process_keep={cfg.resources.in_process_keep} must be >= 1 (the actor in use)")
    if cfg.resources.batch_size < 1:
        p.append("resources.batch_size must be >= 1")
    if cfg.tune.space:
        for key in cfg.tune.space:
            try:
                _locate(cfg, key)
            except ValueError as e:
                p.append(f"tune.space: {e}")
    if not cfg.output.dir:
        p.append("output.dir is empty")
    return p
