"""One precision policy for every model mars_ray runs (training, scoring, embedding, evaluation,
serving, generation).

The rule: bf16 matrix multiplies where the hardware has them natively, fp32 everywhere else.

- Native bf16 means a CUDA GPU of compute capability >= 8 (A100, A10G, L4, H100; not T4 or V100,
  where torch emulates it), or a CPU with bf16 instructions: Intel AMX (``amx_bf16``), AVX512-BF16
  (Intel Cooper Lake and Sapphire Rapids, AMD Zen 4), or Arm's BF16 extension. The CPU is read
  from its flags (``/proc/cpuinfo``), never assumed: a CPU without them would run bf16 through
  a slow emulated path.
- Training (``train.precision``) is mixed precision: the weights, their gradients and the
  optimizer state stay fp32 (the "master" copy), the forward and backward matrix multiplies run in
  bf16 under ``torch.autocast``. DeepSpeed gets its own ``bf16`` section instead.
- Inference (``model.dtype``) loads the weights in bf16 where native.
- In both, the reward head (the final one-output linear layer) computes in fp32 from its input cast
  up: a bf16 reward has 8 significant bits, so two rewards of 2.0 could not differ by less than
  0.016, and the low margins MARS allocates by would be rounded into ties.

Pure torch; no Ray.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CPU_FLAGS_ENV",
    "Precision",
    "cpu_bf16_support",
    "cuda_bf16_support",
    "fp32_head",
    "inference_dtype",
    "native_bf16",
    "resolve_precision",
]

# Tests and odd platforms: a file to read CPU flags from instead of /proc/cpuinfo.
CPU_FLAGS_ENV = "MARS_RAY_CPUINFO"

# Flags that mean bf16 dot products in hardware, with the name we report.
_X86_BF16 = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def cpu_bf16_support(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and what says so (or why not).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None). x86 reports ``flags``, Arm
    ``Features`` (``bf16``).
    """
    if cpuinfo is None:
        path = os.environ.get(CPU_FLAGS_ENV) or "/proc/cpuinfo"
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False, "CPU flags unreadable (no /proc/cpuinfo): bf16 not assumed"
    model = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    where = f" ({model})" if model else ""
    for flag, name in _X86_BF16:
        if flag in flags:
            return True, f"CPU with {name}{where}"
    if "bf16" in flags:  # aarch64: FEAT_BF16
        return True, f"Arm CPU with BF16{where}"
    if not flags:
        return False, "no CPU flags found: bf16 not assumed"
    return False, f"CPU without bf16 instructions (no AMX, AVX512-BF16 or Arm BF16){where}"


def cuda_bf16_support(device: str = "cuda") -> tuple[bool, str]:
    """Whether the CUDA device multiplies bf16 natively (compute capability >= 8.0)."""
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA not available"
    idx = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(idx)
    name = torch.cuda.get_device_name(idx)
    if major >= 8:
        return True, f"GPU {name} (compute capability {major}.{minor})"
    return False, f"GPU {name} (compute capability {major}.{minor} < 8.0: bf16 is emulated)"


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matrix multiplies are native on ``device`` (the policy's one question)."""
    return _support(device)[0]


def _support(device: str) -> tuple[bool, str]:
    if str(device).startswith("cuda"):
        return cuda_bf16_support(str(device))
    ok, why = cpu_bf16_support()
    if ok:
        import torch

        if not torch.backends.mkldnn.is_available():
            return False, f"{why}, but this torch has no oneDNN (mkldnn) for bf16 kernels"
    return ok, why


@dataclass(frozen=True)
class Precision:
    """What a training run computes in, and why (recorded in metrics, summary and model card)."""

    setting: str  # what was asked: auto, fp32 or bf16
    compute: Literal["fp32", "bf16"]
    device_type: str  # "cpu" or "cuda" (torch.autocast's device_type)
    reason: str

    @property
    def bf16(self) -> bool:
        return self.compute == "bf16"

    def autocast(self) -> Any:
        """The context the forward passes (and the loss) run in: bf16 autocast, or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def describe(self) -> str:
        return f"{self.compute} ({self.reason})"


def resolve_precision(setting: str, device: str) -> Precision:
    """``train.precision`` on ``device``: ``auto`` is bf16 mixed precision where bf16 is native,
    else fp32; ``fp32`` and ``bf16`` are taken as asked (bf16 where it is not native is allowed,
    and says that it is emulated).

    Raises:
        ValueError: an unknown setting.
    """
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {setting!r}: use auto, fp32 or bf16")
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if setting == "fp32":
        return Precision(setting, "fp32", device_type, "fp32 asked for")
    ok, why = _support(device)
    if setting == "bf16":
        note = "bf16 asked for" + ("" if ok else f"; not native here ({why}): emulated, likely slower than fp32")
        return Precision(setting, "bf16", device_type, note)
    if ok:
        return Precision(setting, "bf16", device_type, f"auto: bf16 is native on this {why}")
    return Precision(setting, "fp32", device_type, f"auto: {why}")


def inference_dtype(dtype: Any, device: str = "cpu") -> Any:
    """The weights dtype of a model loaded for inference (``model.dtype``, a generator's
    ``dtype``): ``auto`` is bfloat16 where bf16 is native (:func:`native_bf16`), else float32;
    dtype names and torch dtypes pass through.

    Raises:
        ValueError: an unknown dtype name.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if native_bf16(device) else torch.float32
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    out = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return out


# --------------------------------------------------------------------------------------------
# The reward head in fp32
# --------------------------------------------------------------------------------------------


def _fp32_linear_forward(self: Any, x: Any) -> Any:
    import torch
    import torch.nn.functional as F

    # Outside autocast, in fp32 whatever the rest of the model computes in.
    device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    """A subclass of ``cls`` (a Linear) whose forward runs in fp32; one per class, module-level
    so models that carry it deep-copy and pickle."""
    if getattr(cls, "_mars_fp32_head", False):
        return cls
    if cls not in _FP32_CLASSES:
        sub = type(f"Fp32{cls.__name__}", (cls,), {"forward": _fp32_linear_forward, "_mars_fp32_head": True})
        sub.__module__ = __name__
        globals()[sub.__name__] = sub  # importable by name (pickle)
        _FP32_CLASSES[cls] = sub
    return _FP32_CLASSES[cls]


def final_projection(model: Any) -> Any:
    """The last ``nn.Linear`` with one output: the layer that turns the reward model's final
    features into the reward (BERT/DeBERTa ``classifier``, RoBERTa ``classifier.out_proj``,
    Llama-style ``score``).

    Raises:
        ValueError: the model has no such layer.
    """
    import torch

    last = None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.out_features == 1:
            last = mod
    if last is None:
        raise ValueError(f"{type(model).__name__}: no single-output linear head found")
    return last


def fp32_head(model: Any) -> Any:
    """Make ``model``'s reward head keep fp32 weights and compute in fp32 from its input cast up
    (under autocast too); returns the head. The parameter names and the saved weights do not
    change (the head's class becomes a subclass of its own)."""
    head = final_projection(model)
    head.to(dtype=__import__("torch").float32)
    head.__class__ = _fp32_class(type(head))
    return head
