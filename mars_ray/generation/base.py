"""The one interface every text generator implements, and the request helpers the back ends share.

A *request* is either a plain string (seq2seq input, or a single user turn for chat models) or a
list of chat messages ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.

``generate(requests, n)`` returns, for each request, a list of ``n`` outputs; an output is ``None``
when that generation failed (endpoint error after retries, budget exhausted). A generator never
raises for one bad request: callers count failures and carry on, so no pair is lost.
``generate(requests, n, max_new_tokens=[...])`` gives each request its own output cap (at most
``params.max_new_tokens``), so requests with different caps still share one batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable


class GeneratorAuthError(RuntimeError):
    """The back end refused our credentials (HTTP 401/403): no later request can succeed, so a
    generator raises this instead of returning ``None`` outputs."""


class GenerationFailed(RuntimeError):
    """Too many of an operation's generations failed (:func:`check_failure_rate`)."""


def check_failure_rate(operation: str, generated: int, failed: int, max_rate: float, generator: str = "") -> None:
    """Raise :class:`GenerationFailed` when ``failed / (generated + failed)`` exceeds ``max_rate``.

    Raises:
        GenerationFailed: naming the operation, the counts and the generator.
    """
    tried = generated + failed
    if tried and failed / tried > max_rate:
        raise GenerationFailed(
            f"{operation}: {failed} of {tried} generations failed ({failed / tried:.0%} > "
            f"augment.max_failure_rate {max_rate:.0%}){f' with {generator}' if generator else ''}; "
            "check the generator (endpoint URL, key, rate limits, the worker log), or raise "
            "augment.max_failure_rate if failures are expected"
        )


Message = dict[str, str]
Request = str | list[Message]


@dataclass(frozen=True)
class GenParams:
    """Decoding parameters; part of every cache key."""

    max_new_tokens: int = 160
    temperature: float = 0.0  # 0: deterministic (beam search when n > 1, else greedy)
    top_p: float = 1.0
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    seed: int = 0

    def key(self) -> str:
        """The cache-key form: deterministic decoding does not use the seed, so it is left out
        (runs with different seeds share their deterministic outputs)."""
        d = asdict(self)
        if self.temperature == 0:
            d.pop("seed")
        return json.dumps(d, sort_keys=True)


@runtime_checkable
class TextGenerator(Protocol):
    """What every back end implements."""

    model_id: str  # stable id for lineage and cache keys, e.g. "builtin:smollm2" or "openai:gpt-4.1"
    params: GenParams

    def generate(
        self,
        requests: Sequence[Request],
        n: int = 1,
        *,
        max_new_tokens: Sequence[int] | None = None,
        first_slot: int = 0,
    ) -> list[list[str | None]]:
        """``n`` outputs per request (``None`` marks a failed one); never raises for one bad request.
        ``max_new_tokens``: one output cap per request (capped at ``params.max_new_tokens``).
        ``first_slot``: return output slots ``first_slot .. first_slot + n - 1``; a sampled slot
        depends on its request and index only, so a cached prefix of slots can be continued."""
        ...


def request_caps(params: GenParams, n_requests: int, max_new_tokens: Sequence[int] | None) -> list[int]:
    """Each request's output cap: its entry of ``max_new_tokens`` (at least 1), never above
    ``params.max_new_tokens``; all ``params.max_new_tokens`` when ``max_new_tokens`` is None.

    Raises:
        ValueError: ``max_new_tokens`` does not have one entry per request.
    """
    if max_new_tokens is None:
        return [params.max_new_tokens] * n_requests
    caps = [int(c) for c in max_new_tokens]
    if len(caps) != n_requests:
        raise ValueError(f"max_new_tokens has {len(caps)} entries for {n_requests} requests")
    return [max(1, min(c, params.max_new_tokens)) for c in caps]


def as_messages(request: Request, system: str | None = None) -> list[Message]:
    """A request as chat messages (a plain string becomes one user turn)."""
    if isinstance(request, str):
        msgs = [{"role": "user", "content": request}]
    else:
        msgs = [dict(m) for m in request]
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def as_text(request: Request) -> str:
    """A request as plain text (chat messages: the last user turn)."""
    if isinstance(request, str):
        return request
    users = [m["content"] for m in request if m.get("role") == "user"]
    return users[-1] if users else request[-1]["content"]
