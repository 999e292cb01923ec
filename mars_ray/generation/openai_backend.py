"""A :class:`~mars_ray.generation.base.TextGenerator` over any OpenAI-compatible chat endpoint
(OpenAI, vLLM, llama.cpp's server, :mod:`mars_ray.serve.llm_server`, ...).

Design:

- One ``chat.completions`` call per output: ``n`` outputs of a request are ``n`` separate calls
  with ``n=1`` (many servers, llama.cpp among them, ignore ``n``). Slot ``k`` is sent with
  ``seed = params.seed + k`` so a server that honours seeds gives ``n`` different samples at
  ``temperature > 0``, reproducibly. At ``temperature == 0`` the ``n`` outputs are normally
  identical (an endpoint has no beam search), unlike the local generator.
- Retries are the ``openai`` client's own: ``max_retries`` retries with exponential backoff and
  jitter on connection errors, timeouts, 408/409/429 and 5xx, honouring ``retry-after`` /
  ``retry-after-ms`` (a value of 0 falls back to the client's backoff, ~0.4-0.5 s for the first
  retry). No retry loop of ours.
- Every real HTTP attempt passes through an event hook on the ``httpx2`` client handed to
  ``OpenAI(http_client=...)``: it counts attempts, retries and statuses, and enforces
  ``max_requests`` strictly (an attempt over the budget is aborted before it is sent, retries
  included).
- ``max_tokens`` (prompt + completion tokens reported in ``usage``) is checked before every call;
  calls already in flight may overshoot it by at most ``concurrency`` calls.
- A call that still fails gives ``None`` for that output and is counted in
  ``stats["failed_by_reason"]`` under its HTTP status (``"429"``, ``"500"``...), ``"timeout"``,
  ``"connection"``, ``"budget_exhausted"``... ``generate`` never raises for one bad request.
- The API key is read from the environment variable named by ``api_key_env`` and never appears
  in ``repr``, stats, log records or exceptions raised here; it is not pickled either (a pickled
  generator, e.g. shipped to a Ray actor, re-reads it from the environment on the other side).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mars_ray.generation.base import GeneratorAuthError, GenParams, Message, Request, as_messages, request_caps

logger = logging.getLogger(__name__)

__all__ = ["PLACEHOLDER_API_KEY", "BudgetExhausted", "OpenAIGenerator"]

# Sent when no key is set but a base_url is (local servers need none; the client insists on one).
PLACEHOLDER_API_KEY = "not-needed"


class BudgetExhausted(Exception):
    """Raised inside the HTTP event hook to abort an attempt over ``max_requests``/``max_tokens``.

    Not an ``openai``/``httpx2`` error, so the client neither wraps nor retries it.
    """


def _safe_url(url: str | None) -> str | None:
    """The URL without user info, query or fragment (they can carry credentials)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "<unparseable url>"


class OpenAIGenerator:
    """``n`` outputs per request from an OpenAI-compatible ``/chat/completions`` endpoint.

    ``base_url`` is what the ``openai`` client expects (usually ending in ``/v1``); ``None`` means
    api.openai.com. ``system`` is prepended as a system turn when a request has none.
    """

    def __init__(
        self,
        model: str,
        params: GenParams = GenParams(),
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        timeout_s: float = 60,
        max_retries: int = 4,
        max_requests: int | None = None,
        max_tokens: int | None = None,
        system: str | None = None,
    ):
        if not model:
            raise ValueError("model must be a non-empty model name")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.model = model
        self.model_id = f"openai:{model}"
        self.params = params
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.system = system
        self._lock = threading.Lock()
        self._local = threading.local()
        self._budget_warned = False
        self._auth_error: str | None = None  # set by the first 401/403: every later call raises
        self._reset_counters()
        self._client = self._make_client()

    # ------------------------------------------------------------------ set-up
    def _read_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.base_url:
            return PLACEHOLDER_API_KEY
        raise ValueError(
            f"no API key: environment variable {self.api_key_env} is not set "
            "(set it, or give base_url for a local server that needs no key)"
        )

    def _make_client(self) -> Any:
        import openai

        key = self._read_key()
        # Keep the key only as a redaction pattern (never printed), to scrub server error text.
        self._secret = key if key != PLACEHOLDER_API_KEY else None
        http_client = openai.DefaultHttpx2Client(
            event_hooks={"request": [self._on_request], "response": [self._on_response]},
        )
        return openai.OpenAI(
            api_key=key,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
            http_client=http_client,
        )

    def _reset_counters(self) -> None:
        self._attempts = 0  # real HTTP attempts (including retries)
        self._retries = 0
        self._calls = 0  # logical calls started (one per output slot that reached the client)
        self._succeeded = 0
        self._failed: dict[str, int] = {}
        self._http_status: dict[str, int] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._truncated = 0  # finish_reason == "length"

    def reset_stats(self) -> None:
        """Zero the counters and the budgets' usage (a new run)."""
        with self._lock:
            self._reset_counters()
            self._budget_warned = False

    # ------------------------------------------------------------- HTTP hooks
    def _on_request(self, request: Any) -> None:
        """Runs in the calling thread before every HTTP attempt (retries included)."""
        with self._lock:
            if self._over_budget_locked():
                raise BudgetExhausted("budget exhausted")
            self._attempts += 1
            n = getattr(self._local, "attempt", 0) + 1
            self._local.attempt = n
            if n > 1:
                self._retries += 1

    def _on_response(self, response: Any) -> None:
        with self._lock:
            code = str(response.status_code)
            self._http_status[code] = self._http_status.get(code, 0) + 1

    def _over_budget_locked(self) -> bool:
        if self.max_requests is not None and self._attempts >= self.max_requests:
            return True
        return self.max_tokens is not None and self._prompt_tokens + self._completion_tokens >= self.max_tokens

    # ---------------------------------------------------------------- counters
    def _fail(self, reason: str) -> None:
        with self._lock:
            self._failed[reason] = self._failed.get(reason, 0) + 1
            warn_budget = reason == "budget_exhausted" and not self._budget_warned
            if warn_budget:
                self._budget_warned = True
        if warn_budget:
            logger.warning(
                "%s: request budget exhausted (max_requests=%s, max_tokens=%s): remaining outputs are None",
                self.model_id,
                self.max_requests,
                self.max_tokens,
            )

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (thread-safe copy)."""
        with self._lock:
            failed = dict(self._failed)
            return {
                "requests": self._attempts,
                "calls": self._calls,
                "retries": self._retries,
                "succeeded": self._succeeded,
                "failed": sum(failed.values()),
                "failed_by_reason": failed,
                "http_status": dict(self._http_status),
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "truncated": self._truncated,
            }

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "<redacted>") if self._secret else text

    # ---------------------------------------------------------------- generate
    def generate(
        self,
        requests: Sequence[Request],
        n: int = 1,
        *,
        max_new_tokens: Sequence[int] | None = None,
        first_slot: int = 0,
    ) -> list[list[str | None]]:
        """``n`` outputs per request (one chat completion each, slot k asked with seed
        ``params.seed + k``); ``max_new_tokens``: one ``max_tokens`` per request (at most
        ``params.max_new_tokens``); ``first_slot``: the slots start there."""
        out: list[list[str | None]] = [[None] * n for _ in requests]
        if n <= 0 or not requests:
            return [[] for _ in requests] if n <= 0 else out
        caps = request_caps(self.params, len(requests), max_new_tokens)
        msgs: list[list[Message] | None] = []
        for r in requests:
            try:
                msgs.append(as_messages(r, self.system))
            except Exception:  # a malformed request fails alone
                msgs.append(None)
        jobs = [(i, k) for i in range(len(requests)) for k in range(n)]
        t0 = time.monotonic()
        workers = max(1, min(self.concurrency, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-gen") as pool:
            futures = {pool.submit(self._one, msgs[i], first_slot + k, caps[i]): (i, k) for i, k in jobs}
            for fut, (i, k) in futures.items():
                try:
                    out[i][k] = fut.result()
                except GeneratorAuthError:
                    raise  # the pool's exit waits for the rest, which stop at their first attempt
                except Exception as err:  # defensive: _one catches everything it expects
                    self._fail("error")
                    logger.warning("%s: unexpected %s", self.model_id, type(err).__name__)
        logger.debug("%s: %d outputs in %.2f s", self.model_id, len(jobs), time.monotonic() - t0)
        return out

    def _one(self, messages: list[Message] | None, slot: int, max_tokens: int) -> str | None:
        import openai

        if messages is None:
            self._fail("bad_request")
            return None
        if self._auth_error is not None:
            raise GeneratorAuthError(self._auth_error)
        with self._lock:
            over = self._over_budget_locked()
            if not over:
                self._calls += 1
        if over:
            self._fail("budget_exhausted")
            return None
        p = self.params
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": max_tokens,
            "n": 1,
            "seed": p.seed + slot,
        }
        self._local.attempt = 0
        try:
            completion = self._client.chat.completions.create(**kwargs)
        except BudgetExhausted:
            self._fail("budget_exhausted")
            return None
        except openai.APITimeoutError:  # before APIConnectionError: it is a subclass
            self._log_failure("timeout")
            return None
        except openai.APIConnectionError:
            self._log_failure("connection")
            return None
        except openai.APIStatusError as err:
            self._log_failure(str(err.status_code), getattr(err, "message", ""))
            if err.status_code in (401, 403):
                self._auth_error = (
                    f"{self.model_id} at {_safe_url(self.base_url) or 'api.openai.com'} answered "
                    f"{err.status_code}: the key in ${self.api_key_env} is missing, wrong or not allowed "
                    f"this model ({self._redact(str(getattr(err, 'message', '')))[:200]})"
                )
                raise GeneratorAuthError(self._auth_error) from None
            return None
        except openai.APIResponseValidationError:
            self._log_failure("invalid_response")
            return None
        except Exception as err:  # e.g. a non-JSON body from a misbehaving server
            self._log_failure("error", type(err).__name__)
            return None
        finally:
            self._local.attempt = 0
        try:
            choice = completion.choices[0]
            text = choice.message.content
            finish = choice.finish_reason
        except (AttributeError, IndexError, TypeError):
            text, finish = None, None
        usage = getattr(completion, "usage", None)
        with self._lock:
            if usage is not None:
                self._prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
                self._completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
            if finish == "length":
                self._truncated += 1
            if text is not None:
                self._succeeded += 1
        if text is None:
            self._log_failure("empty_response")
        return text

    def _log_failure(self, reason: str, detail: str = "") -> None:
        self._fail(reason)
        detail = self._redact(str(detail))[:200]
        logger.warning("%s: request failed (%s)%s", self.model_id, reason, f": {detail}" if detail else "")

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"OpenAIGenerator(model_id={self.model_id!r}, base_url={_safe_url(self.base_url)!r}, "
            f"api_key_env={self.api_key_env!r}, concurrency={self.concurrency}, timeout_s={self.timeout_s}, "
            f"max_retries={self.max_retries}, max_requests={self.max_requests}, max_tokens={self.max_tokens})"
        )

    # Picklable without the key or the client (e.g. for Ray): rebuilt from the environment.
    _CONFIG_FIELDS = (
        "model",
        "params",
        "base_url",
        "api_key_env",
        "concurrency",
        "timeout_s",
        "max_retries",
        "max_requests",
        "max_tokens",
        "system",
    )

    def __getstate__(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self._CONFIG_FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        model = state.pop("model")
        params = state.pop("params")
        self.__init__(model, params, **state)
