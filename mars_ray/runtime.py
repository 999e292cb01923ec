"""Ray start-up shared by every command (thin wiring; no algorithm code here).

The same command runs three ways, chosen by configuration only:

- locally: no address anywhere -> start a private local Ray (``resources.num_cpus``);
- as a job: ``ray job submit ... -- mars-ray ...`` sets ``RAY_ADDRESS`` for the driver, which joins
  the cluster it was submitted to (its runtime_env, e.g. ``--working-dir``, is already applied);
- remote driver: ``--ray-address`` / ``resources.ray_address`` (``auto``, ``ray://host:10001``).
"""

from __future__ import annotations

import os
import re
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
    "MARS_RAY_PLACEMENT_LOG",  # where every device choice is logged (runtime.PLACEMENT_LOG_ENV)
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

    env = {k: os.environ[k] for k in (*_FORWARDED_ENV, console.VERBOSE_ENV) if k in os.environ}
    device = os.environ.get(DEVICE_ENV)
    if device:
        # "cuda:N" names a GPU of the driver's machine; a Ray worker sees only the GPUs it reserved
        # (Ray sets CUDA_VISIBLE_DEVICES), so there it means the reserved one.
        env[DEVICE_ENV] = "cuda" if device.startswith("cuda") else device
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
            # A job driver: Ray merges our env_vars into the runtime_env of `ray job submit`, and a
            # key set by both is refused, so the job's own values are kept and only ours added.
            ray.init(runtime_env={"env_vars": _env_missing_from_job(runtime_env["env_vars"])}, **kwargs)
        else:
            # No dashboard: it costs ~1 GB of RSS here (measured: 1.7 vs 0.7 GB for a bare local Ray).
            runtime_env["worker_process_setup_hook"] = "mars_ray.runtime.quiet_state_api_pollers"
            for k, v in LOCAL_RAY_ENV.items():
                runtime_env["env_vars"].setdefault(k, os.environ.get(k, v))
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=runtime_env, **kwargs)
    console.quiet_ray_data()
    return ray.get_runtime_context()


def _env_missing_from_job(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the keys the submitted job's runtime_env already sets (Ray passes a job
    driver its job config as JSON in ``RAY_JOB_CONFIG_JSON_ENV_VAR``)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {} if raw else {}
    except (ValueError, AttributeError):
        job_env = {}
    return {k: v for k, v in env.items() if k not in job_env}


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
        if want != "cpu" and not re.fullmatch(r"cuda(:\d+)?", want):
            raise ValueError(f"resources.device={want!r}: use auto, cpu, cuda or cuda:N")
        if want.startswith("cuda"):
            _check_cuda(want)
        return _logged(want)
    reserved = _reserved_gpus()
    if reserved:  # this Ray actor or worker reserved GPUs: it runs on them or fails, never on the CPU
        device = reserved_device(reserved, os.environ.get("CUDA_VISIBLE_DEVICES"))
        _check_cuda(device, reserved)
        return _logged(device)
    if reserved is not None:  # in Ray, nothing reserved: the GPUs belong to other actors
        return _logged("cpu")
    return _logged("cuda" if torch.cuda.is_available() else "cpu")


# A file to which every device choice appends one JSON line (who, where, which GPU ids, which
# device): set it to a path on the shared filesystem to see where each model of a job loaded.
PLACEMENT_LOG_ENV = "MARS_RAY_PLACEMENT_LOG"


def _logged(device: str) -> str:
    path = os.environ.get(PLACEMENT_LOG_ENV)
    if path:
        import inspect
        import json

        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame and frame.f_back else None  # pick_device's caller
        name = caller.f_code.co_name if caller else "?"
        owner = caller.f_locals.get("self") if caller else None
        who = f"{type(owner).__name__}.{name}" if owner is not None else name
        row = {"who": who, "pid": os.getpid(), **placement(device)}
        with open(path, "a", encoding="utf-8") as f:  # one short line per write: appends stay whole
            f.write(json.dumps(row) + "\n")
    return device


def reserved_device(reserved: list, visible: str | None) -> str:
    """The torch device of the first GPU Ray reserved for this process. Ray sets
    CUDA_VISIBLE_DEVICES to the reserved ids, except that Ray Train shares it among the workers of
    a node (each sees every GPU of its node's workers): there the GPU is ``cuda:<its position>``,
    and plain ``cuda`` would put every worker of a node on the first one."""
    ids = [x.strip() for x in (visible or "").split(",") if x.strip()]
    mine = str(reserved[0])
    if len(ids) > 1 and mine in ids:
        return f"cuda:{ids.index(mine)}"
    return "cuda"


def _reserved_gpus() -> list | None:
    """The GPU ids Ray gave this process ([] none), or None outside a connected Ray."""
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else None
    except Exception:  # Ray not importable or not connected
        return None


def _check_cuda(want: str, reserved: list | None = None) -> None:
    """Raise a ValueError naming this node, its torch and CUDA versions when ``want`` (``cuda`` or
    ``cuda:N``) cannot be used here: a GPU reserved or asked for must be used, or the run stops."""
    import platform

    import torch

    where = f"on node {platform.node()} (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    held = f"this process reserved GPU(s) {reserved} from Ray, " if reserved else ""
    if not torch.cuda.is_available():
        raise ValueError(
            f"{held}device {want!r} asked for, but CUDA is not available {where}: install the CUDA build "
            "of torch that matches the node's driver (nvidia-smi), or set resources.device cpu "
            "(MARS_RAY_DEVICE=cpu) to run the model code on the CPU on purpose"
        )
    if ":" in want:
        index, count = int(want.split(":", 1)[1]), torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"device {want!r} asked for, but this process sees {count} GPU(s) {where}; inside a Ray "
                "actor or worker the GPU it reserved is 'cuda' (use resources.device cuda or auto)"
            )


def torch_config(*, use_gpu: bool, backend: str = "auto", device: str = "auto") -> Any:
    """Ray Train's process-group settings: ``backend`` (``train.backend``), where auto is NCCL on
    GPUs the workers run on, gloo on CPUs and when ``device`` (``resources.device``) is cpu."""
    from ray.train.torch import TorchConfig

    if backend == "auto":
        device = str(device if device != "auto" else os.environ.get(DEVICE_ENV, "auto")).lower()
        backend = "nccl" if use_gpu and device != "cpu" else "gloo"
    return TorchConfig(backend=backend)


def placement(device: str | None = None) -> dict[str, Any]:
    """Where this process runs: its node, the GPU ids Ray gave it ([] none or outside Ray) and the
    device its models load on; recorded in eval.json, the training metrics and the serve info."""
    import platform

    gpu_ids = _reserved_gpus()
    out: dict[str, Any] = {"host": platform.node(), "gpu_ids": [str(g) for g in gpu_ids or []]}
    out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import ray

        if ray.is_initialized():
            out["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # Ray not importable or not connected
        pass
    out["device"] = device if device is not None else pick_device()
    return out


def on_reserved_gpus(resources: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in one Ray task that reserves ``resources.gpus_per_actor`` GPUs and
    ``cpus_per_actor`` CPUs (default 1) when ``gpus_per_actor`` > 0, else in this process.

    A command's own model work (``eval``, ``winrate``, a trial's held-out evaluation) would
    otherwise run in the job driver, which holds no GPU (``ray.get_gpu_ids()`` is empty in a
    driver, also with ``--entrypoint-num-gpus``) and usually sits on a CPU-only head. Exceptions
    come back as the task's exception (still an instance of the original class)."""
    if not float(getattr(resources, "gpus_per_actor", 0) or 0) > 0:
        return fn(*args, **kwargs)
    import ray

    init_ray(resources)
    cpus = float(resources.cpus_per_actor) if resources.cpus_per_actor is not None else 1.0
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Not inside the caller's placement group (a Tune trial's holds only the trial's own CPU):
    # the task reserves its GPU from the cluster.
    task = ray.remote(
        num_gpus=float(resources.gpus_per_actor),
        num_cpus=cpus,
        max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )(fn)
    return ray.get(task.remote(*args, **kwargs))


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
