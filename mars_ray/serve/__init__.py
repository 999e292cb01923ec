"""Reward-model serving on Ray Serve (``mars-ray serve``).

- :mod:`mars_ray.serve.protocol`: the pure part (wire format, validation, query splitting,
  normalisation, what ``--model`` points to); no Ray.
- :mod:`mars_ray.serve.app`: the Serve deployment (FastAPI ingress + ``@serve.batch``), ``build_app``,
  ``start``/``stop``, ``get_handle``.
- :mod:`mars_ray.serve.client`: :class:`RewardClient`, an HTTP client with timeouts and retries.

Importing this package is cheap: Ray Serve and torch load only with :mod:`mars_ray.serve.app`.
"""

from mars_ray.serve.client import RewardClient, RewardClientError, RewardServerError
from mars_ray.serve.protocol import RequestError

__all__ = ["RequestError", "RewardClient", "RewardClientError", "RewardServerError", "get_handle"]


def get_handle(app_name: str = "mars-reward"):
    """The DeploymentHandle of a running reward app: ``get_handle().score.remote(prompts, responses)``."""
    from mars_ray.serve.app import get_handle as _get

    return _get(app_name)
