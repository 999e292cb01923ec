"""Reward-model training on Ray Train: the per-worker loop (DDP or DeepSpeed ZeRO, LoRA,
checkpoints) and the DeepSpeed config. May import :mod:`mars_ray.config`, :mod:`mars_ray.core`,
:mod:`mars_ray.models` and :mod:`mars_ray.runtime`; heavy imports happen on first use.
"""

from mars_ray.train.deepspeed_config import build_ds_config
from mars_ray.train.loop import MODEL_SUBDIR, TRAIN_STATE, FitResult, FitSpec, fit_reward_model, train_loop_per_worker

__all__ = [
    "MODEL_SUBDIR",
    "TRAIN_STATE",
    "FitResult",
    "FitSpec",
    "build_ds_config",
    "fit_reward_model",
    "train_loop_per_worker",
]
