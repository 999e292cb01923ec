"""Ray start-up shared by every command (thin wiring; no algorithm code here).

The same command runs three ways, chosen by configuration only:

- locally: no address anywhere -> start a private local Ray (``resources.num_cpus``);
- as a job: ``ray job submit ... -- mars-ray ...`` sets ``RAY_ADDRESS`` for the driver, which joins
  the cluster it was submitted to (its runtime_env, e.g. ``--working-dir``, is already applied);
- remote driver: ``--ray-address`` / ``resources.ray_address`` (``auto``, ``ray://host:10001``).
"""

from __future__ import annotations

import os
from typing import Any

from mars_ray.config import ResourcesConfig

# Environment that workers need to behave like the driver (offline hub, caches, thread counts).
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "MARS_RAY_CACHE",
    "DS_ACCELERATOR",
    "MARS_RAY_CPUINFO",  # the precision policy's CPU flags file (tests; odd platforms)
)


# Settings of the private local Ray only (a cluster keeps its own). Ray Train's controller polls
# its workers every 2 s by default, and a fit's start and end each wait for a poll: at 0.5 s an
# empty one-worker fit took ~2 s less here (13 -> 11 s on 2 cores), and a run has one fit per
# epoch plus the warm-up. Polling four times faster costs nothing measurable with a few workers.
# Ray Train 2.60 also starts a PreemptionWatcher actor per run (it polls for spot-node preemption
# notices): on a private local Ray there are none, and the actor holds ~120 MB (PSS, measured).
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def worker_env() -> dict[str, str]:
    from mars_ray import console

    env = {k: os.environ[k] for k in (*_FORWARDED_ENV, console.VERBOSE_ENV, DEVICE_ENV) if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k, v in {**console.library_env(), **console.worker_log_env()}.items():
        env.setdefault(k, v)
    return env


def init_ray(cfg: ResourcesConfig, **kwargs: Any):
    """Start or join Ray once per process; returns ``ray.get_runtime_context()``.

    Re-entrant: does nothing if Ray is already initialised (tests and nested commands).
    """
    import ray

    device = str(getattr(cfg, "device", "auto") or "auto")
    if device != "auto":
        os.environ[DEVICE_ENV] = device  # this process, and every Ray worker through worker_env()

    from mars_ray import console

    if ray.is_initialized():
        return ray.get_runtime_context()
    console.quiet_libraries()
    kwargs = {**console.ray_init_kwargs(), **kwargs}
    runtime_env = {"env_vars": worker_env()}
    with console.quiet_ray_core():
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, runtime_env=runtime_env, **kwargs)
        elif os.environ.get("RAY_ADDRESS"):
            # A job driver: its runtime_env comes from `ray job submit` (merging ours could conflict).
            ray.init(**kwargs)
        else:
            # No dashboard: it costs ~1 GB of RSS here (measured: 1.7 vs 0.7 GB for a bare local Ray).
            runtime_env["worker_process_setup_hook"] = "mars_ray.runtime.quiet_state_api_pollers"
            for k, v in LOCAL_RAY_ENV.items():
                runtime_env["env_vars"].setdefault(k, os.environ.get(k, v))
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=runtime_env, **kwargs)
    console.quiet_ray_data()
    return ray.get_runtime_context()


_STATE_API_NOISE = "Failed to query Ray Train Controller actor state"


def _drop_state_api_noise(record) -> bool:
    return _STATE_API_NOISE not in record.getMessage()


def quiet_state_api_pollers() -> None:
    """Worker set-up hook of the private local Ray. Ray Train's PlacementGroupCleaner asks the
    state API (served by the dashboard, which we do not start) whether the train controller is
    alive, and logs a warning each second it cannot while a fit runs. The cleaner is still stopped
    by the controller at the end of every fit; only that one message is dropped."""
    import logging

    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    logger = logging.getLogger(name)
    if _drop_state_api_noise not in logger.filters:
        logger.addFilter(_drop_state_api_noise)


def auto_cpus(explicit: float | None, parallel: int) -> float:
    """``explicit`` if set, else an even share of the Ray cluster's CPUs over ``parallel`` actors or
    workers (at least 1, at most 8: beyond that, more torch threads rarely pay off)."""
    if explicit is not None:
        return float(explicit)
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else float(os.cpu_count() or 1)
    return float(max(1, min(8, int(total // max(1, parallel)))))


# --------------------------------------------------------------------------------------------
# The device policy
# --------------------------------------------------------------------------------------------
#
# One device policy for every model mars_ray loads.
#
# A model goes on the accelerator Ray assigned to the actor or worker that loads it, else on the
# CPU: inside Ray, ``ray.get_gpu_ids()`` says what this process reserved (Ray sets
# ``CUDA_VISIBLE_DEVICES`` to it, so the reserved GPU is ``cuda`` / ``cuda:0`` here); a process that
# reserved none stays on the CPU even when the machine has GPUs (another actor holds them). Outside
# Ray (``mars-ray eval`` run alone, a test) the visible GPU is used when there is one.
# ``resources.device`` (exported to every Ray worker as ``MARS_RAY_DEVICE``) overrides the choice:
# ``cpu``, ``cuda``, ``cuda:N``. The compute precision per device is the precision policy's
# (:mod:`mars_ray.models.precision`: bf16 where it is native, else fp32).

DEVICE_ENV = "MARS_RAY_DEVICE"


def pick_device(override: str | None = None) -> str:
    """The device to load a model on (the policy in the comment above).

    Raises:
        ValueError: a CUDA device asked for where CUDA is not available.
    """
    import torch

    want = (override or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if want not in ("", "auto"):
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"resources.device={want!r} but CUDA is not available in this process")
        if want != "cpu" and not want.startswith("cuda"):
            raise ValueError(f"resources.device={want!r}: use auto, cpu, cuda or cuda:N")
        return want
    if not torch.cuda.is_available():
        return "cpu"
    try:
        import ray

        if ray.is_initialized():
            return "cuda" if ray.get_gpu_ids() else "cpu"
    except Exception:  # Ray not importable or not connected: the plain rule below
        pass
    return "cuda"


def release_memory() -> None:
    """Collect garbage, then hand the heap's free pages back to the OS (glibc ``malloc_trim``):
    freed model weights otherwise stay in this process's RSS, and the next model is allocated
    beside them. Called where an in-process run drops a model (a stage actor, a training run)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return
    trim(0)
