"""A small HTTP client for the reward server (``mars-ray serve``), with timeouts and retries, and
a TRL reward function built on it.

Light: this module needs ``requests`` (and ``mars_ray.config``'s PyYAML) only, never Ray, torch or
DeepSpeed, so an RL job can import it from a mars_ray install without loading the training stack,
or copy this one file into its own code.

Retries are urllib3's :class:`~urllib3.util.retry.Retry` mounted on a ``requests`` session (no
hand-written retry loop): connection errors, read timeouts and the statuses that mean "try again"
(429, 502, 503, 504 by default; a ``Retry-After`` header is honoured) are retried with exponential
backoff. POST is retried too: scoring has no side effects, so a repeated request is harmless. Other
errors are not retried: a 4xx says what is wrong with the request (raised as
:class:`RewardServerError` with the server's message and field), a 500 is a server bug.

Usage::

    from mars_ray.serve import RewardClient
    with RewardClient("http://127.0.0.1:8000", token_env="MARS_SERVE_TOKEN") as rm:
        rewards = rm.score(prompts, responses)          # lists longer than chunk_size are split
        cmp = rm.compare(prompt, chosen, rejected)      # {"margin", "probability", ...}
        rewards = rm.get_reward(queries, prompts)       # the OpenRLHF endpoint
        rewards = rm.score_messages(conversations)      # chat messages, scored in the model's format

TRL (``GRPOTrainer`` / ``RLOOTrainer``)::

    from mars_ray.serve.client import RewardFunction
    trainer = GRPOTrainer(model=..., reward_funcs=[RewardFunction("http://127.0.0.1:8000")], ...)

Conversational datasets send each prompt's messages plus the completion as one conversation
(``/get_reward``'s ``messages``), so the reward model reads it in the format it was trained on;
plain-text datasets send (prompt, completion) pairs to ``/score``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

__all__ = ["RewardClient", "RewardClientError", "RewardFunction", "RewardServerError"]


class RewardClientError(RuntimeError):
    """The server could not be reached (after the retries) or answered something unreadable."""


class RewardServerError(RewardClientError):
    """The server answered with an error status; ``message`` and ``field`` come from its JSON body."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.field = field


class RewardClient:
    """Calls ``/score``, ``/compare``, ``/get_reward`` and ``/health`` of one reward server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (plus the app's route prefix, if any).
        token: bearer token; or ``token_env``, the environment variable holding it.
        timeout: seconds to connect and to wait for an answer: ``(connect, read)`` or one number.
        retries: how many times one call is retried (connection errors, read timeouts, retry statuses).
        backoff_factor: exponential backoff (urllib3: ``factor * 2 ** (retry - 1)`` seconds, capped
            at ``backoff_max``).
        retry_statuses: HTTP statuses that are retried.
        chunk_size: :meth:`score` sends at most this many pairs per request (the server's
            ``serve.max_batch_items``).
        pool_maxsize: connections kept per host (threads sharing one client).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        token_env: str | None = None,
        timeout: float | tuple[float, float] = (3.05, 60.0),
        retries: int = 3,
        backoff_factor: float = 0.25,
        backoff_max: float = 10.0,
        retry_statuses: Sequence[int] = (429, 502, 503, 504),
        chunk_size: int = 256,
        pool_maxsize: int = 16,
    ) -> None:
        if token is None and token_env is not None:
            token = os.environ.get(token_env) or None
            if token is None:
                raise RewardClientError(f"the environment variable {token_env} (the bearer token) is unset or empty")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.chunk_size = int(chunk_size)
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            redirect=0,
            allowed_methods=frozenset({"GET", "POST"}),
            status_forcelist=tuple(retry_statuses),
            backoff_factor=backoff_factor,
            backoff_max=backoff_max,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=pool_maxsize)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["Content-Type"] = "application/json"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:  # never shows the token
        return f"RewardClient({self.base_url!r}, auth={'Authorization' in self._session.headers})"

    # ------------------------------------------------------------------ calls
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            r = self._session.request(method, url, json=body, timeout=self.timeout)
        except requests.RequestException as e:
            raise RewardClientError(f"{method} {url} failed after retries: {type(e).__name__}: {e}") from e
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            if isinstance(data, dict) and "error" in data:
                raise RewardServerError(r.status_code, str(data["error"]), data.get("field"))
            raise RewardServerError(r.status_code, (r.text or r.reason or "")[:500])
        if not isinstance(data, dict):
            raise RewardClientError(f"{method} {url}: the answer is not a JSON object: {r.text[:200]!r}")
        return data

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """r(prompts[i], responses[i]) for every i, in order (several requests for long lists)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out: list[float] = []
        for i in range(0, len(prompts), self.chunk_size):
            data = self._request(
                "POST",
                "/score",
                {
                    "prompts": list(prompts[i : i + self.chunk_size]),
                    "responses": list(responses[i : i + self.chunk_size]),
                },
            )
            out.extend(float(x) for x in data["rewards"])
        return out

    def compare(self, prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
        """``{"chosen_reward", "rejected_reward", "margin", "probability", "normalized"}``."""
        return self._request("POST", "/compare", {"prompt": prompt, "chosen": chosen, "rejected": rejected})

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        """The OpenRLHF endpoint: rewards of whole ``prompt + response`` texts (chat-templated or
        plain; the server reads them back into conversations)."""
        body: dict[str, Any] = {"query": list(queries)}
        if prompts is not None:
            body["prompts"] = list(prompts)
        return [float(x) for x in self._request("POST", "/get_reward", body)["rewards"]]

    def score_messages(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[float]:
        """Rewards of conversations, each ending with the assistant reply to score (``{"role",
        "content"}`` messages), read in the reward model's own format."""
        out: list[float] = []
        for i in range(0, len(conversations), self.chunk_size):
            chunk = [
                [{"role": m["role"], "content": m["content"]} for m in c]
                for c in conversations[i : i + self.chunk_size]
            ]
            out.extend(float(x) for x in self._request("POST", "/get_reward", {"messages": chunk})["rewards"])
        return out

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_conversation(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _text(x: Any) -> str:
    """A plain prompt or completion as text (a one-message list gives its content)."""
    if isinstance(x, str):
        return x
    if _is_conversation(x):
        return "".join(str(m["content"]) for m in x)
    return str(x)


class RewardFunction:
    """A TRL reward function (``reward_funcs=[RewardFunction(url)]``) scoring completions with a
    served reward model.

    TRL calls it with ``prompts``, ``completions`` and every dataset column as keyword arguments and
    takes one float per completion. Conversational data (message lists) is sent as conversations,
    prompt messages then the completion's assistant message; plain text as (prompt, completion)
    pairs. A server that cannot be reached after the client's retries raises: a run never goes on
    with made-up rewards. Picklable (each process opens its own connection).

    Args:
        url: the reward server, e.g. ``http://127.0.0.1:8000``.
        name: how TRL names this reward in its logs (TRL before 1.9 reads ``__name__``).
        **client: :class:`RewardClient` options (``token_env``, ``timeout``, ``retries``, ...).
    """

    def __init__(self, url: str, *, name: str = "mars_ray_reward", **client: Any) -> None:
        self.url = url
        self.__name__ = name
        self._options = client
        self._client: RewardClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "name": self.__name__, "options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], name=state["name"], **state["options"])

    @property
    def client(self) -> RewardClient:
        if self._client is None:
            self._client = RewardClient(self.url, **self._options)
        return self._client

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if completions and _is_conversation(completions[0]):
            convs = [
                [*(p if _is_conversation(p) else [{"role": "user", "content": _text(p)}]), *c]
                for p, c in zip(prompts, completions)
            ]
            return self.client.score_messages(convs)
        return self.client.score([_text(p) for p in prompts], [_text(c) for c in completions])
