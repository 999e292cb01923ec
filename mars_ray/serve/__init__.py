"""Servers: the reward model on Ray Serve (``mars-ray serve``) and a local OpenAI-compatible LLM
server (``mars-ray llm-server``).

- :mod:`mars_ray.serve.protocol`: the pure part (wire format, validation, query splitting,
  normalisation, what ``--model`` points to); no Ray.
- :mod:`mars_ray.serve.app`: the Serve deployment (FastAPI ingress + ``@serve.batch``), ``build_app``,
  ``start``/``stop``, ``get_handle``.
- :mod:`mars_ray.serve.client`: :class:`RewardClient`, an HTTP client with timeouts and retries.
- :mod:`mars_ray.serve.llm_server`: any :class:`~mars_ray.generation.TextGenerator` over an
  OpenAI-compatible chat API (FastAPI + uvicorn, no Ray), for tests and as an offline endpoint.

May import :mod:`mars_ray.models`, :mod:`mars_ray.generation` and :mod:`mars_ray.runtime`.
Importing this package is cheap: Ray Serve and torch load only with :mod:`mars_ray.serve.app`.
"""

from mars_ray.serve.client import RewardClient, RewardClientError, RewardServerError
from mars_ray.serve.protocol import RequestError

__all__ = ["RequestError", "RewardClient", "RewardClientError", "RewardServerError", "get_handle"]


def get_handle(app_name: str = "mars-reward"):
    """The DeploymentHandle of a running reward app: ``get_handle().score.remote(prompts, responses)``."""
    from mars_ray.serve.app import get_handle as _get

    return _get(app_name)
