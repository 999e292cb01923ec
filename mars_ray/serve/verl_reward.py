"""verl's custom reward function, backed by a served mars_ray reward model.

verl (0.7 and later) calls a user function for every rollout it scores, with keyword arguments
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **kwargs)``:
``solution_str`` is the decoded response alone (no prompt, no EOS) and ``extra_info`` the row's
``extra_info`` column from the training parquet, merged with ``custom_reward_function.reward_kwargs``
(``verl/trainer/ppo/reward.py``, ``verl/experimental/reward_loop/reward_manager/naive.py``). A
pairwise reward model needs the prompt, so the dataset carries it in ``extra_info`` (a string, or
the chat messages); this module sends it with the response to ``mars-ray serve`` and returns the
reward.

verl config (Hydra overrides, verl 0.9; older versions read the same keys at the top level)::

    reward.custom_reward_function.path=/path/to/site-packages/mars_ray/serve/verl_reward.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.url=http://RM_HOST:8000

The URL may instead come from ``MARS_RAY_REWARD_URL``, and the bearer token from the variable named
by ``token_env`` (default ``MARS_RAY_REWARD_TOKEN``, if set). Requests are retried (connection
errors, timeouts, 429/502/503/504); a server that stays unreachable raises, so verl fails the step
instead of training on made-up rewards. Needs ``requests`` only (no Ray, torch or DeepSpeed).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from mars_ray.serve.client import RewardClient

__all__ = ["compute_score"]

URL_ENV = "MARS_RAY_REWARD_URL"
TOKEN_ENV = "MARS_RAY_REWARD_TOKEN"
PROMPT_KEYS = ("prompt", "question", "raw_prompt")

_clients: dict[tuple[str, str | None], RewardClient] = {}
_lock = threading.Lock()


def _client(url: str, token_env: str | None, retries: int, timeout: float) -> RewardClient:
    key = (url, token_env)
    with _lock:
        if key not in _clients:
            env = token_env if token_env and os.environ.get(token_env) else None
            _clients[key] = RewardClient(url, token_env=env, retries=retries, timeout=(3.05, timeout))
        return _clients[key]


def _prompt(extra_info: Mapping[str, Any] | None, prompt_key: str | None) -> Any:
    info = dict(extra_info or {})
    keys = (prompt_key,) if prompt_key else PROMPT_KEYS
    for k in keys:
        if k in info and info[k] is not None:
            return info[k]
    raise ValueError(
        f"compute_score: extra_info has no prompt under {', '.join(repr(k) for k in keys)} (it has "
        f"{sorted(info) or 'no keys'}); verl passes the response alone, so put each row's prompt (a string or its "
        "chat messages) in the dataset's extra_info column, or name the key with reward_kwargs.prompt_key"
    )


def _messages(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, Sequence) and not isinstance(value, str):
        msgs = list(value)
        if all(isinstance(m, Mapping) and "role" in m and "content" in m for m in msgs):
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
    return None


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """The served reward model's reward of ``solution_str`` answering the row's prompt.

    Keyword options (verl's ``reward_kwargs``, or arguments): ``url`` (default
    ``$MARS_RAY_REWARD_URL``), ``token_env``, ``prompt_key`` (default: ``prompt``, ``question``,
    ``raw_prompt``), ``retries`` (5), ``timeout`` (seconds, 180). ``data_source`` and
    ``ground_truth`` are not used by a reward model.

    Raises:
        ValueError: no URL, or no prompt in ``extra_info``.
        mars_ray.serve.client.RewardClientError: the server could not be reached after the retries,
            or answered with an error.
    """
    info = dict(extra_info or {})
    url = kwargs.get("url") or info.get("reward_url") or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"compute_score: no reward server URL: set reward_kwargs.url or ${URL_ENV}")
    client = _client(
        str(url),
        kwargs.get("token_env", TOKEN_ENV),
        int(kwargs.get("retries", 5)),
        float(kwargs.get("timeout", 180.0)),
    )
    prompt = _prompt(info, kwargs.get("prompt_key"))
    messages = _messages(prompt)
    if messages is not None:
        return client.score_messages([[*messages, {"role": "assistant", "content": str(solution_str)}]])[0]
    return client.score([str(prompt)], [str(solution_str)])[0]
