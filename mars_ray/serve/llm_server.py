"""A small OpenAI-compatible chat server (FastAPI + uvicorn) in front of any
:class:`~mars_ray.generation.base.TextGenerator`.

Endpoints:

- ``POST /v1/chat/completions``: non-streaming; request fields ``model`` (echoed, not used to
  pick a model), ``messages``, ``temperature``, ``top_p``, ``max_tokens`` (or
  ``max_completion_tokens``), ``n``, ``seed``; unknown fields are accepted and ignored. The
  response follows the OpenAI schema (``choices[i].message.content``, ``finish_reason``,
  ``usage``). Errors use the OpenAI error body ``{"error": {"message", "type", "code"}}``;
  invalid requests are 400.
- ``GET /v1/models``: the one served model. ``GET /health``. ``GET /stats``: counters
  (requests received, responses by status, injected faults, batches...).

Decoding parameters: each request's ``max_tokens``/``temperature``/``top_p``/``seed`` override the
generator's ``params`` for that request. A generator whose ``generate`` accepts ``params=`` gets
them as an argument; otherwise (``LocalChatGenerator``) ``generator.params`` is swapped for the
duration of the call under the server's lock. A generator whose ``params`` cannot be set is run
with its own parameters (a warning says so once). ``n`` is honoured (``generate(requests, n)``).

Concurrency: one worker thread owns the generator (one ``generate`` at a time). Concurrent
requests with the same decoding parameters (seed aside) are micro-batched: the worker waits up
to ``batch_wait_s`` for up to ``max_batch`` of them and makes one ``generate`` call. With
``temperature > 0`` and a local generator, each request's seed becomes its output slot
(``generate(..., first_slot=[seed, ...])``), so a request's sample depends on its own text and
seed only, not on what it was batched with; other generators get the batch's first seed (pass
``max_batch=1`` for per-request reproducibility there).

Usage counts come from the generator's tokenizer when it has one (``encode``/``tokenizer``),
otherwise from whitespace words. ``finish_reason`` is ``"length"`` when the completion used the
whole ``max_tokens`` budget, else ``"stop"``.

Fault injection for tests (:class:`Faults`, fixed at start): the first ``fail_first`` chat requests
are answered with ``fail_status`` (a ``retry-after`` header on 429/503), and chat requests can be
delayed by ``delay_s`` to force client timeouts (a request whose client has gone away by then is
not generated).

Binds 127.0.0.1 by default. :func:`run_server` starts it in a background thread and returns a
handle with ``.url`` (ending in ``/v1``) and ``.stop()``; :func:`main` is the command line::

    python -m mars_ray.serve.llm_server --model builtin:smollm2 --port 8011
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mars_ray.generation import GenParams, Message, TextGenerator

logger = logging.getLogger(__name__)

__all__ = ["Faults", "ServerHandle", "create_app", "main", "run_server"]


@dataclass(frozen=True)
class Faults:
    """Faults injected into ``POST /v1/chat/completions`` (counted over the server's life)."""

    fail_first: int = 0  # the first N chat requests are answered with fail_status
    fail_status: int = 429
    retry_after: float | None = 0  # `retry-after` header (seconds) on injected 429/503; None: no header
    delay_s: float = 0.0  # sleep this long before answering a chat request
    delay_first: int | None = None  # delay only the first N chat requests (None: all)


# --------------------------------------------------------------------------- generation worker


@dataclass
class _Job:
    messages: list[Message]
    params: GenParams
    n: int
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        p = self.params
        return (self.n, p.max_new_tokens, p.temperature, p.top_p, p.num_beams, p.no_repeat_ngram_size)


_STOP = object()


class _Worker:
    """Owns the generator: one ``generate`` at a time, compatible jobs micro-batched."""

    def __init__(self, generator: TextGenerator, max_batch: int, batch_wait_s: float):
        self.gen = generator
        self.max_batch = max(1, int(max_batch))
        self.batch_wait_s = max(0.0, float(batch_wait_s))
        self.lock = threading.Lock()  # around the model (and the params swap)
        self.q: queue.Queue[Any] = queue.Queue()
        self.batches = 0
        self.batched_requests = 0
        self.max_batch_seen = 0
        self.generate_seconds = 0.0
        self._params_mode = self._detect_params_mode(generator)
        try:  # per-request sampling slots (the local generators)
            self._slots = "first_slot" in inspect.signature(generator.generate).parameters
        except (TypeError, ValueError):
            self._slots = False
        self._warned_params = False
        self._thread = threading.Thread(target=self._loop, name="openai-server-generate", daemon=True)
        self._thread.start()

    @staticmethod
    def _detect_params_mode(gen: Any) -> str:
        try:
            if "params" in inspect.signature(gen.generate).parameters:
                return "argument"
        except (TypeError, ValueError):
            pass
        try:
            current = gen.params
            gen.params = current  # settable?
            return "swap"
        except Exception:
            return "fixed"

    def submit(self, job: _Job) -> Future:
        self.q.put(job)
        return job.future

    def stop(self, timeout: float = 5.0) -> None:
        self.q.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        pending: deque[_Job] = deque()
        stopping = False
        while not stopping:
            first = pending.popleft() if pending else self.q.get()
            if first is _STOP:
                break
            batch = [first]
            rest: deque[_Job] = deque()
            for j in pending:
                (batch if j.key == first.key and len(batch) < self.max_batch else rest).append(j)
            pending = rest
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    j = self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait()
                except queue.Empty:
                    break
                if j is _STOP:
                    stopping = True
                    break
                (batch if j.key == first.key else pending).append(j)
            self._run(batch)
        # Stopping: whatever is left fails fast.
        leftovers = list(pending)
        while True:
            try:
                j = self.q.get_nowait()
            except queue.Empty:
                break
            if j is not _STOP:
                leftovers.append(j)
        for j in leftovers:
            if not j.future.done():
                j.future.set_exception(RuntimeError("server stopping"))

    def _run(self, batch: list[_Job]) -> None:
        first = batch[0]
        requests = [j.messages for j in batch]
        t0 = time.perf_counter()
        try:
            with self.lock:
                if self._slots and first.params.temperature > 0 and self._params_mode == "swap":
                    outs = self._generate(
                        # a request's seed is its sampling slot (slots are non-negative)
                        requests,
                        first.n,
                        replace(first.params, seed=0),
                        slots=[j.params.seed % 2**31 for j in batch],
                    )
                else:
                    outs = self._generate(requests, first.n, first.params)
                usage = [self._usage(j, row) for j, row in zip(batch, outs)]
        except BaseException as err:
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        finally:
            self.generate_seconds += time.perf_counter() - t0
        self.batches += 1
        self.batched_requests += len(batch)
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        for j, row, u in zip(batch, outs, usage):
            if not j.future.done():
                j.future.set_result((row, u))

    def _generate(
        self, requests: list[list[Message]], n: int, params: GenParams, slots: list[int] | None = None
    ) -> list[list[str | None]]:
        gen: Any = self.gen
        if self._params_mode == "argument":
            outs = gen.generate(requests, n, params=params)
        elif self._params_mode == "swap":
            saved = gen.params
            gen.params = params
            try:
                outs = gen.generate(requests, n, first_slot=slots) if slots is not None else gen.generate(requests, n)
            finally:
                gen.params = saved
        else:
            if not self._warned_params:
                self._warned_params = True
                logger.warning(
                    "%s: params cannot be set per request; using the generator's own",
                    getattr(gen, "model_id", type(gen).__name__),
                )
            outs = gen.generate(requests, n)
        if len(outs) != len(requests) or any(len(row) != n for row in outs):
            raise RuntimeError("the generator returned the wrong number of outputs")
        return outs

    # token counts (worker thread only: fast tokenizers are not safe to share across threads)
    def _usage(self, job: _Job, row: Sequence[str | None]) -> tuple[int, list[int]]:
        return self._prompt_tokens(job.messages), [self._text_tokens(t or "") for t in row]

    def _prompt_tokens(self, messages: list[Message]) -> int:
        gen: Any = self.gen
        enc = getattr(gen, "encode", None)
        if callable(enc):
            try:
                return len(enc(messages))
            except Exception:
                pass
        return sum(self._text_tokens(m.get("content") or "") for m in messages)

    def _text_tokens(self, text: str) -> int:
        tok = getattr(self.gen, "tokenizer", None)
        if tok is not None:
            try:
                return len(tok(text, add_special_tokens=False)["input_ids"])
            except Exception:
                pass
        return len(text.split())


# --------------------------------------------------------------------------- the app


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = None


class ChatRequest(BaseModel):
    """The fields this server uses; any other OpenAI field is accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=1, ge=1)
    seed: int | None = None
    stream: bool | None = False


def _error(status: int, message: str, etype: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _content_text(content: Any) -> str:
    """Message content as text (OpenAI also allows a list of parts: the text parts are joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif isinstance(part, dict):
            raise ValueError(f"unsupported content part type {part.get('type')!r} (text only)")
        else:
            parts.append(str(part))
    return "".join(parts)


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0  # chat requests received (valid JSON schema)
        self.invalid = 0  # rejected as invalid (400)
        self.unauthorized = 0
        self.injected_failures = 0
        self.delayed = 0
        self.abandoned = 0  # client gone after the delay: not generated
        self.completed = 0
        self.errors = 0  # generation errors (500)
        self.by_status: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def status(self, code: int) -> None:
        with self.lock:
            self.by_status[str(code)] = self.by_status.get(str(code), 0) + 1


def create_app(
    generator: TextGenerator,
    *,
    faults: Faults | None = None,
    served_model: str | None = None,
    api_key: str | None = None,
    max_batch: int | None = None,
    batch_wait_s: float = 0.01,
    max_tokens_cap: int = 2048,
    max_n: int = 16,
):
    """The FastAPI app (the generation worker starts now; ``app.state.worker.stop()`` ends it).

    ``api_key``: when set, requests must send ``Authorization: Bearer <api_key>`` (else 401).
    ``max_batch``: requests per ``generate`` call (default: the generator's ``batch_size`` or 8).
    """
    faults = faults or Faults()
    model_name = served_model or getattr(generator, "model_id", "model")
    if max_batch is None:
        max_batch = int(getattr(generator, "batch_size", 8) or 8)
    worker = _Worker(generator, max_batch, batch_wait_s)
    counters = _Counters()
    created = int(time.time())
    defaults: GenParams = getattr(generator, "params", GenParams())

    app = FastAPI(title="mars_ray OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.counters = counters
    app.state.faults = faults

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError):
        with counters.lock:
            counters.invalid += 1
        counters.status(400)
        errs = exc.errors()
        where = ".".join(str(x) for x in errs[0].get("loc", ())) if errs else ""
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return _error(400, f"invalid request: {where}: {msg}", "invalid_request_error")

    def _authorized(request: HTTPRequest) -> bool:
        if api_key is None:
            return True
        got = request.headers.get("authorization", "")
        expected = f"Bearer {api_key}"
        return hmac.compare_digest(got.encode(), expected.encode())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/stats")
    async def stats():
        with counters.lock:
            out = {k: v for k, v in vars(counters).items() if k != "lock"}
            out["by_status"] = dict(counters.by_status)
        out.update(
            batches=worker.batches,
            batched_requests=worker.batched_requests,
            max_batch_seen=worker.max_batch_seen,
            generate_seconds=round(worker.generate_seconds, 3),
            params_mode=worker._params_mode,
            faults=asdict(faults),
            model=model_name,
        )
        return out

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        if not _authorized(request):
            counters.status(401)
            return _error(401, "invalid or missing API key", "invalid_request_error", "invalid_api_key")
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "mars_ray"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest, body: ChatRequest):
        with counters.lock:
            counters.received += 1
            index = counters.received
        if not _authorized(request):
            with counters.lock:
                counters.unauthorized += 1
            counters.status(401)
            return _error(401, "invalid or missing API key", "invalid_request_error", "invalid_api_key")
        if index <= faults.fail_first:
            with counters.lock:
                counters.injected_failures += 1
            counters.status(faults.fail_status)
            headers = None
            if faults.retry_after is not None and faults.fail_status in (429, 503):
                headers = {"retry-after": f"{faults.retry_after:g}"}
            etype = "rate_limit_error" if faults.fail_status == 429 else "server_error"
            return _error(faults.fail_status, f"injected fault ({index}/{faults.fail_first})", etype, headers=headers)
        if faults.delay_s > 0 and (faults.delay_first is None or index <= faults.delay_first):
            with counters.lock:
                counters.delayed += 1
            await asyncio.sleep(faults.delay_s)
            if await request.is_disconnected():
                with counters.lock:
                    counters.abandoned += 1
                return _error(499, "client closed the request", "client_closed")
        if body.stream:
            counters.status(400)
            return _error(400, "stream=true is not supported by this server", "invalid_request_error")
        try:
            messages = [{"role": m.role, "content": _content_text(m.content)} for m in body.messages]
        except ValueError as err:
            counters.status(400)
            return _error(400, str(err), "invalid_request_error")
        max_new = body.max_tokens or body.max_completion_tokens or defaults.max_new_tokens
        max_new = max(1, min(int(max_new), max_tokens_cap))
        params = replace(
            defaults,
            max_new_tokens=max_new,
            temperature=defaults.temperature if body.temperature is None else float(body.temperature),
            top_p=defaults.top_p if body.top_p is None else float(body.top_p),
            seed=defaults.seed if body.seed is None else int(body.seed),
        )
        n = int(body.n or 1)
        if n > max_n:
            counters.status(400)
            return _error(400, f"n must be <= {max_n}", "invalid_request_error")
        job = _Job(messages=messages, params=params, n=n)
        try:
            row, (prompt_tokens, completion_tokens) = await asyncio.wrap_future(worker.submit(job))
        except Exception as err:
            with counters.lock:
                counters.errors += 1
            counters.status(500)
            logger.warning("generation failed: %s", type(err).__name__)
            return _error(500, f"generation failed ({type(err).__name__})", "server_error")
        if any(t is None for t in row):
            with counters.lock:
                counters.errors += 1
            counters.status(500)
            return _error(500, "generation failed for this request", "server_error")
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length" if ctoks >= max_new else "stop",
                "logprobs": None,
            }
            for i, (text, ctoks) in enumerate(zip(row, completion_tokens))
        ]
        total_completion = int(sum(completion_tokens))
        with counters.lock:
            counters.completed += 1
            counters.prompt_tokens += prompt_tokens
            counters.completion_tokens += total_completion
        counters.status(200)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": total_completion,
                "total_tokens": prompt_tokens + total_completion,
            },
        }

    return app


# --------------------------------------------------------------------------- running it


class ServerHandle:
    """A server running in a background thread: ``.url`` (``http://host:port/v1``), ``.stop()``."""

    def __init__(self, server: Any, thread: threading.Thread, sock: socket.socket, app: Any, host: str, port: int):
        self._server = server
        self._thread = thread
        self._sock = sock
        self.app = app
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.root_url = f"http://{shown}:{port}"
        self.url = f"{self.root_url}/v1"
        self._stopped = False

    def stats(self) -> dict[str, Any]:
        """``GET /stats`` without HTTP."""
        c = self.app.state.counters
        with c.lock:
            out = {k: v for k, v in vars(c).items() if k != "lock"}
            out["by_status"] = dict(c.by_status)
        w = self.app.state.worker
        out.update(batches=w.batches, batched_requests=w.batched_requests, max_batch_seen=w.max_batch_seen)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(2.0)
        self.app.state.worker.stop(timeout=5.0)
        with contextlib.suppress(OSError):
            self._sock.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle(url={self.url!r}, running={self.running})"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(
    generator: TextGenerator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults | None = None,
    served_model: str | None = None,
    api_key: str | None = None,
    max_batch: int | None = None,
    batch_wait_s: float = 0.01,
    log_level: str = "warning",
    startup_timeout_s: float = 30.0,
    graceful_shutdown_s: int = 1,
) -> ServerHandle:
    """Serve ``generator`` with uvicorn in a background thread; returns once it accepts requests.

    ``port=0`` picks a free port (see ``handle.port``/``handle.url``). Logging is left as the
    caller configured it (uvicorn's own logging set-up is not applied).
    """
    import uvicorn

    app = create_app(
        generator,
        faults=faults,
        served_model=served_model,
        api_key=api_key,
        max_batch=max_batch,
        batch_wait_s=batch_wait_s,
    )
    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=host,
        port=actual_port,
        log_config=None,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=graceful_shutdown_s,
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{actual_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(2.0)
            app.state.worker.stop()
            sock.close()
            raise RuntimeError(f"the server on {host}:{actual_port} did not start")
        time.sleep(0.005)
    handle = ServerHandle(server, thread, sock, app, host, actual_port)
    logger.info("serving %s at %s", served_model or getattr(generator, "model_id", "?"), handle.url)
    return handle


def _build_generator(args: argparse.Namespace) -> TextGenerator:
    from mars_ray.generation.local import make_generator

    params = GenParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    local: dict[str, Any] = {}
    if args.backend != "openai":
        from mars_ray.runtime import pick_device

        local["device"] = pick_device()  # the GPU this process may use, else the CPU
    return make_generator(args.backend, args.model, params, batch_size=args.batch_size, **local)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve a local model over an OpenAI-compatible API until SIGINT/SIGTERM."""
    ap = argparse.ArgumentParser(
        prog="python -m mars_ray.serve.llm_server",
        description="Serve a local model (builtin:smollm2, a folder, a hub id) over an OpenAI-compatible "
        "/v1/chat/completions API.",
    )
    ap.add_argument("--model", default="builtin:smollm2", help="model reference (default: builtin:smollm2)")
    ap.add_argument("--backend", default="local", choices=["local", "seq2seq"])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8011, help="0 picks a free port (printed)")
    ap.add_argument("--served-model-name", default=None, help="model name reported by the API (default: --model)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="default when a request gives no max_tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="default when a request gives none")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="requests per model.generate call")
    ap.add_argument("--batch-wait-s", type=float, default=0.01, help="how long to gather concurrent requests")
    ap.add_argument(
        "--api-key-env",
        default=None,
        help="require 'Authorization: Bearer <key>' with the key read from this environment variable",
    )
    ap.add_argument("--fail-first", type=int, default=0, help="fault injection: fail the first N chat requests")
    ap.add_argument("--fail-status", type=int, default=429)
    ap.add_argument("--retry-after", type=float, default=0)
    ap.add_argument("--delay-s", type=float, default=0.0, help="fault injection: delay chat requests")
    ap.add_argument("--delay-first", type=int, default=None)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: environment variable {args.api_key_env} is not set", file=sys.stderr)
            return 2
    faults = Faults(
        fail_first=args.fail_first,
        fail_status=args.fail_status,
        retry_after=args.retry_after,
        delay_s=args.delay_s,
        delay_first=args.delay_first,
    )
    t0 = time.perf_counter()
    generator = _build_generator(args)
    logger.info("model %s ready in %.1f s", args.model, time.perf_counter() - t0)
    handle = run_server(
        generator,
        host=args.host,
        port=args.port,
        faults=faults,
        served_model=args.served_model_name or args.model,
        api_key=api_key,
        max_batch=args.batch_size,
        batch_wait_s=args.batch_wait_s,
        log_level=args.log_level.lower(),
    )
    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    print(f"mars_ray openai_server: serving {args.served_model_name or args.model} at {handle.url}", flush=True)
    try:
        while not done.wait(0.5):
            if not handle._thread.is_alive():
                logger.error("the server thread ended unexpectedly")
                return 1
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
