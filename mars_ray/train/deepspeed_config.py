"""DeepSpeed config dict from mars_ray's :class:`DeepSpeedConfig` + :class:`TrainConfig` (no imports
of deepspeed here: the dict is plain data, checked before any worker starts)."""

from __future__ import annotations

from typing import Any

from mars_ray.config import DeepSpeedConfig, TrainConfig

__all__ = ["build_ds_config"]


def build_ds_config(
    ds: DeepSpeedConfig, train: TrainConfig, *, world_size: int, bf16: bool = False, on_gpu: bool = False
) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize``.

    ``bf16``: the run's resolved precision is bf16 (:func:`mars_ray.models.precision.resolve_precision`
    of ``train.precision``): DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights
    and optimizer state in its own optimizer wrapper).

    ``train.batch_size`` is the micro-batch of pairs per worker (each pair is two sequences);
    ``train_batch_size = batch_size * grad_accum * world_size``. The optimizer is AdamW
    (``torch_adam`` avoids compiling fused Adam), lr / weight decay from ``train``, gradient
    clipping 1.0 (the same as the non-DeepSpeed path). The learning rate schedule (warm-up) is
    applied by the training loop on the optimizer's param groups, so no DeepSpeed scheduler.

    Raises:
        ValueError: an inconsistent combination, with the setting that fixes it.
    """
    problems: list[str] = []
    if world_size < 1:
        problems.append(f"world_size={world_size}: DeepSpeed needs >= 1 worker (set train.num_workers >= 1)")
    if ds.stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.stage={ds.stage} must be 0, 1, 2 or 3")
    if ds.offload_params and ds.stage != 3:
        problems.append("deepspeed.offload_params needs deepspeed.stage=3 (or set deepspeed.offload_params=false)")
    if ds.offload_optimizer and ds.stage == 0:
        problems.append(
            "deepspeed.offload_optimizer needs deepspeed.stage >= 1 (or set deepspeed.offload_optimizer=false)"
        )
    if train.batch_size < 1 or train.grad_accum < 1:
        problems.append("train.batch_size and train.grad_accum must be >= 1")
    if train.lr <= 0:
        problems.append(f"train.lr={train.lr} must be > 0")
    if problems:
        raise ValueError("invalid DeepSpeed settings:\n  - " + "\n  - ".join(problems))

    zero: dict[str, Any] = {"stage": int(ds.stage)}
    if ds.offload_optimizer:
        # CPU optimizer offload compiles the cpu_adam op once (about a minute).
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.stage in (2, 3):
        zero["overlap_comm"] = bool(on_gpu if ds.overlap_comm is None else ds.overlap_comm)
        zero["contiguous_gradients"] = True

    return {
        "train_micro_batch_size_per_gpu": int(train.batch_size),
        "gradient_accumulation_steps": int(train.grad_accum),
        "train_batch_size": int(train.batch_size) * int(train.grad_accum) * int(world_size),
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(train.lr),
                "weight_decay": float(train.weight_decay),
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "torch_adam": bool(ds.torch_adam),
            },
        },
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
