"""Models: resolution of hub ids, local paths and built-in offline models (``builtin:minilm``,
``builtin:smollm2``) in :mod:`~mars_ray.models.resolve`, and reward models (load, score, save) in
:mod:`~mars_ray.models.reward`. Text generators live in :mod:`mars_ray.generation`.

May import :mod:`mars_ray.core`; never Ray. Importing this package is cheap: heavy libraries load on first use.
"""

from mars_ray.models.resolve import (
    BUILTIN_MODELS,
    ModelResolutionError,
    ResolvedModel,
    cache_root,
    is_offline,
    load_causal_lm,
    load_sentence_encoder,
    load_tokenizer,
    minilm_path,
    resolve_model,
    smollm2_gguf_path,
)

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
