"""Text generation: everything that turns a request into text, for rewrites, paraphrases,
West-of-N responses and judges.

- :mod:`~mars_ray.generation.base`: the :class:`TextGenerator` interface, :class:`GenParams`, request helpers;
- :mod:`~mars_ray.generation.cache`: the on-disk content-hash cache and :class:`LazyGenerator`;
- :mod:`~mars_ray.generation.local`: local chat and seq2seq back ends (transformers) and
  :func:`~mars_ray.generation.local.make_generator`, the factory for every back end;
- :mod:`~mars_ray.generation.ragged_decode`: greedy decoding with a shared prefix and shrinking batches;
- :mod:`~mars_ray.generation.openai_backend`: any OpenAI-compatible endpoint;
- :mod:`~mars_ray.generation.prompts`: prompt templates (the files live in ``mars_ray/prompts/``).

May import :mod:`mars_ray.models` (model resolution) and :mod:`mars_ray.core`; never Ray, stages or
commands. Importing the package is cheap: torch, transformers and openai load with the back ends.
"""

from mars_ray.generation.base import (
    GenerationFailed,
    GeneratorAuthError,
    GenParams,
    Message,
    Request,
    TextGenerator,
    as_messages,
    as_text,
    check_failure_rate,
    request_caps,
)
from mars_ray.generation.cache import CachedGenerator, CacheStats, GenerationCache, LazyGenerator, default_cache

__all__ = [
    "CacheStats",
    "CachedGenerator",
    "GenParams",
    "GenerationCache",
    "GenerationFailed",
    "GeneratorAuthError",
    "LazyGenerator",
    "Message",
    "Request",
    "TextGenerator",
    "as_messages",
    "as_text",
    "check_failure_rate",
    "default_cache",
    "request_caps",
]
