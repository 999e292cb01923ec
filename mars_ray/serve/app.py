"""Ray Serve deployment of a Bradley-Terry reward model (HTTP + DeploymentHandle).

One replica = one process that loads the reward model once (:func:`load_reward_model`), sets its
torch threads, warms up with one forward pass, and then serves:

- over HTTP (FastAPI ingress; wire format in :mod:`mars_ray.serve.protocol`): ``POST /score``,
  ``POST /compare``, ``POST /get_reward`` (OpenRLHF), ``GET /health``;
- through a :class:`ray.serve.handle.DeploymentHandle` inside the cluster (RL workers, no HTTP)::

      from mars_ray.serve import get_handle
      h = get_handle()                                   # serve.get_app_handle(serve.app_name)
      rewards = h.score.remote(prompts, responses).result()     # or: await h.score.remote(...)
      cmp = h.compare.remote(prompt, chosen, rejected).result()
      out = h.get_reward.remote(queries, prompts).result()      # OpenRLHF-shaped dict

  Handle calls skip the bearer token (they come from inside the cluster) but get the same
  validation; a bad call raises :class:`~mars_ray.serve.protocol.RequestError` (a ValueError).

OpenRLHF: point ``--remote_rm_url`` (``--reward.remote_url`` from 0.10.2) at
``http://HOST:PORT/get_reward``. Each query is read back into its conversation and scored in the
reward model's own format (:func:`mars_ray.serve.protocol.query_item`); texts beyond the model's
context are truncated by the training rule (counted in ``extra_logs.truncated``), and a request of
many items (OpenRLHF 0.9.0 and earlier post the whole rollout batch) is scored in chunks of
``CHUNK_ITEMS`` that join the replica's batches like separate requests. verl: ``POST /classify``
(vLLM's pooling API) or the ``compute_score`` adapter in :mod:`mars_ray.serve.verl`.

Batching: every request (HTTP or handle) is one item of ``@serve.batch``; a batch holds up to
``serve.max_batch_size`` requests, waiting at most ``serve.batch_wait_timeout_s`` for the batch to
fill. The batch's pairs are flattened, encoded with the training-time rule
(:func:`~mars_ray.models.reward.encode_pairs`: prompt left-truncated to ``data.max_prompt_tokens``,
response capped at ``data.max_response_tokens``), sorted by length and run in forward passes of
``serve.forward_batch_size`` sequences and ``serve.forward_max_tokens`` padded token slots,
each padded only to its own longest row, under
``torch.inference_mode`` (:func:`~mars_ray.models.reward.score_encoded`). The forward passes run in
one worker thread, so the replica's event loop keeps accepting, validating and rejecting requests
while a batch computes. If a batch fails, its requests are retried one by one so that only the
request at fault gets the error.

Safety: requests are validated before they join a batch (4xx JSON errors naming the field and
index), bodies are read with a byte cap (``serve.max_request_bytes``, checked against
``Content-Length`` first), texts and lists are capped, and any unexpected error becomes a 500 JSON
answer without request content; nothing a client sends can raise out of a route. The optional
bearer token (``serve.auth_token_env``) is compared in constant time and is never logged, echoed or
shown in reprs. ``GET /health`` without the token says only that the app is up; with it (or on a
server without one) it adds the model, run directory, process and counters. A non-loopback
``serve.host`` without a token is refused unless ``serve.allow_unauthenticated``.
"""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mars_ray.serve import protocol as P

logger = logging.getLogger("ray.serve")

# A draining server's 503s ask clients to come back after this many seconds: by then the server
# has stopped (`mars-ray serve` exits within about 7 s of SIGTERM), so a client that waits gets a
# refused connection instead of a request cut off by a stopping proxy.
DRAIN_RETRY_AFTER_S = 10
# A request of more items is scored in chunks of this many, each its own item of @serve.batch, so
# one large rollout batch neither monopolises a forward group nor holds all its texts' encodings at once.
CHUNK_ITEMS = 256

api = FastAPI(title="mars_ray reward model", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class RewardServer:
    """A reward model behind HTTP and handle APIs; built by :func:`build_app` from a plain ``spec`` dict."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from mars_ray.models.reward import load_reward_model

        torch.set_num_threads(int(spec["threads"]))
        from mars_ray.runtime import pick_device

        # the GPU this replica reserved (serve.num_gpus), else the CPU
        device = pick_device() if float(spec["num_gpus"]) > 0 else "cpu"
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_reward_model(
            spec["load"],
            seed=int(spec["seed"]),
            dtype=spec["dtype"],
            device=device,
            cache_dir=spec["cache_dir"],
            offline=spec["offline"],
        )
        self.limits = P.Limits(**spec["limits"])
        self.norm = P.Normalizer(**spec["normalizer"])
        self._token: P.Secret = spec["token"]
        self.max_prompt_tokens = int(spec["max_prompt_tokens"])
        self.max_response_tokens = int(spec["max_response_tokens"])
        self.forward_batch_size = int(spec["forward_batch_size"])
        self.forward_max_tokens = spec["forward_max_tokens"]
        # One thread runs every forward pass. OpenMP thread counts are per thread, so the worker sets
        # its own (Ray gives a 1-CPU replica OMP_NUM_THREADS=1).
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="reward-forward",
            initializer=torch.set_num_threads,
            initargs=(int(spec["threads"]),),
        )
        self._score_batch.set_max_batch_size(int(spec["max_batch_size"]))
        self._score_batch.set_batch_wait_timeout_s(float(spec["batch_wait_timeout_s"]))
        self._executor.submit(self._forward, ["warm-up"], ["warm-up"]).result()
        self.counters = {
            "requests": 0,
            "batches": 0,
            "pairs": 0,
            "largest_batch": 0,
            "rejected": 0,
            "failed": 0,
            "refused_draining": 0,
        }
        # Set by drain() when the server is stopping: HTTP requests get 503 while those in flight finish.
        self._draining = False
        self._inflight = 0
        self.info = {
            "model_id": spec["model_id"],
            "config_hash": spec["config_hash"],
            "run_dir": spec["run_dir"],
            "device": device,
            "threads": int(spec["threads"]),
            "normalized": self.norm.enabled,
            "normalization": {"mean": self.norm.mean, "std": self.norm.std, "source": self.norm.source}
            if self.norm.enabled
            else None,
            "max_batch_size": int(spec["max_batch_size"]),
            "batch_wait_timeout_s": float(spec["batch_wait_timeout_s"]),
            "limits": spec["limits"],
            "auth": self._token.get() is not None,
            "load_seconds": round(time.perf_counter() - t0, 2),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------------ model
    def _forward(self, prompts: list[str], responses: list[str]) -> list[tuple[float, bool, int]]:
        """(reward, whether the token limits cut the pair, tokens read) per pair: the training-time
        encoding (prompt keeps its end, response its start), length-sorted forward passes."""
        from mars_ray.models.reward import encode_pairs, score_encoded

        enc = encode_pairs(
            self.tokenizer,
            prompts,
            responses,
            max_prompt_tokens=self.max_prompt_tokens,
            max_response_tokens=self.max_response_tokens,
        )
        out = score_encoded(
            self.model, self.tokenizer, enc, batch_size=self.forward_batch_size, max_tokens=self.forward_max_tokens
        )
        cut = enc.cut or [False] * len(out)
        return [(float(x), bool(c), int(n)) for x, c, n in zip(out, cut, enc.lengths)]

    def _forward_items(self, items: list[tuple[list[str], list[str]]]) -> list[Any]:
        """Score a whole batch of requests in one length-sorted pass; on failure, request by request."""
        prompts = [p for ps, _ in items for p in ps]
        responses = [r for _, rs in items for r in rs]
        try:
            flat = self._forward(prompts, responses)
        except Exception as e:
            if len(items) == 1:
                return [e]
            out: list[Any] = []
            for ps, rs in items:
                try:
                    out.append(self._forward(ps, rs))
                except Exception as e1:
                    out.append(e1)
            return out
        res, i = [], 0
        for ps, _ in items:
            res.append(flat[i : i + len(ps)])
            i += len(ps)
        return res

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # the config's values are set in __init__
    async def _score_batch(self, items: list[tuple[list[str], list[str]]]) -> list[Any]:
        self.counters["batches"] += 1
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(items))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._forward_items, items)

    async def _raw_cut(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[bool], int]:
        """Rewards, truncation flags and tokens read; a request of more than ``CHUNK_ITEMS`` pairs
        goes in chunks."""
        self.counters["requests"] += 1
        self.counters["pairs"] += len(prompts)
        if not prompts:
            return [], [], 0
        chunks = [
            (prompts[i : i + CHUNK_ITEMS], responses[i : i + CHUNK_ITEMS]) for i in range(0, len(prompts), CHUNK_ITEMS)
        ]
        parts = await asyncio.gather(*(self._score_batch(c) for c in chunks))
        for res in parts:
            if isinstance(res, BaseException):
                self.counters["failed"] += 1
                raise res
        flat = [x for res in parts for x in res]
        return [r for r, _, _ in flat], [c for _, c, _ in flat], sum(n for _, _, n in flat)

    async def _raw(self, prompts: list[str], responses: list[str]) -> list[float]:
        return (await self._raw_cut(prompts, responses))[0]

    async def _items(self, items: list[P.RewardItem]) -> tuple[list[float], list[bool], int]:
        out = await self._raw_cut([it.prompt for it in items], [it.response for it in items])
        for it in items:  # which input formats the server has been reading
            key = f"format_{it.family}"
            self.counters[key] = self.counters.get(key, 0) + 1
        return out

    # ------------------------------------------------------------------ Python API (DeploymentHandle)
    async def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """r(prompts[i], responses[i]) for every i (normalised when serve.normalize is on)."""
        prompts, responses = P.validate_pairs(prompts, responses, self.limits)
        return self.norm.apply(await self._raw(prompts, responses))

    async def compare(self, prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
        """Rewards of both responses, raw margin and sigma(margin) (see :mod:`mars_ray.serve.protocol`)."""
        prompt, chosen, rejected = P.parse_compare(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected}, self.limits
        )
        rc, rr = await self._raw([prompt, prompt], [chosen, rejected])
        nc, nr = self.norm.apply([rc, rr])
        margin = rc - rr
        return {
            "chosen_reward": nc,
            "rejected_reward": nr,
            "margin": margin,
            "probability": P.sigmoid(margin),
            "normalized": self.norm.enabled,
        }

    async def get_reward(
        self,
        query: list[str] | None = None,
        prompts: list[str] | None = None,
        labels: Any = None,
        messages: list[list[dict[str, str]]] | None = None,
    ) -> dict[str, Any]:
        """OpenRLHF's remote reward model: ``{"rewards", "scores", "extra_logs"}`` (labels are
        ignored); ``messages``: conversations instead of rendered queries."""
        body: dict[str, Any] = {"messages": messages} if messages is not None else {"query": query}
        if prompts is not None:
            body["prompts"] = prompts
        return await self._get_reward_body(body)

    async def _get_reward_body(self, body: dict[str, Any]) -> dict[str, Any]:
        items = P.parse_get_reward(body, self.limits)
        raw, cut, _ = await self._items(items)
        rewards = self.norm.apply(raw)
        return {"rewards": rewards, "scores": rewards, "extra_logs": P.reward_logs(items, cut)}

    async def _classify_body(self, body: dict[str, Any], *, pooling: bool = False) -> dict[str, Any]:
        """vLLM's ``/classify`` (or ``/pooling``) answer for a one-label reward model."""
        items, activation, model = P.parse_classify(body, self.limits)
        raw, _, tokens = await self._items(items)
        rewards = self.norm.apply(raw)
        values = [P.sigmoid(r) if activation else r for r in rewards]
        name = model or self.info["model_id"]
        created = int(time.time())
        if pooling:
            data = [{"index": i, "object": "pooling", "data": [v]} for i, v in enumerate(values)]
        else:
            data = [{"index": i, "label": "LABEL_0", "probs": [v], "num_classes": 1} for i, v in enumerate(values)]
        prefix = "pool" if pooling else "classify"
        return {
            "id": f"{prefix}-{os.urandom(8).hex()}",
            "object": "list",
            "created": created,
            "model": name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", **self.info, "counters": dict(self.counters)}

    # ------------------------------------------------------------------ HTTP
    async def _read_body(self, request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.strip().isdigit() and int(size) > self.limits.max_request_bytes:
            raise P.body_too_large(int(size), self.limits)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.limits.max_request_bytes:
                raise P.body_too_large(n, self.limits)
            chunks.append(chunk)
        return P.parse_json_body(b"".join(chunks), self.limits)

    async def drain(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Stop taking HTTP requests (503 with Retry-After from now on) and wait, at most
        ``timeout_s``, until those in flight have been answered. Idempotent; returns this
        replica's id and what is still in flight."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "inflight": self._inflight}

    async def _http(self, request: Request, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]):
        if self._draining:
            self.counters["refused_draining"] += 1
            return JSONResponse(
                {"error": "the reward server is shutting down; retry after Retry-After seconds", "field": None},
                status_code=503,
                # the client closes this connection, so none is left open when the proxy stops
                headers={"Retry-After": str(DRAIN_RETRY_AFTER_S), "Connection": "close"},
            )
        self._inflight += 1
        try:
            return await self._http_inner(request, handler)
        finally:
            self._inflight -= 1

    async def _http_inner(self, request: Request, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]):
        try:
            if not P.bearer_ok(request.headers.get("authorization"), self._token.get()):
                self.counters["rejected"] += 1
                return JSONResponse(
                    {
                        "error": "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                        "with the token from the server's serve.auth_token_env variable",
                        "field": "Authorization",
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            body = await self._read_body(request)
            return JSONResponse(await handler(body))
        except P.RequestError as e:
            self.counters["rejected"] += 1
            return JSONResponse(e.to_json(), status_code=e.status)
        except Exception as e:
            logger.exception("reward scoring failed: %s", type(e).__name__)
            return JSONResponse(
                {
                    "error": f"internal error while scoring ({type(e).__name__}); the replica log has the details",
                    "field": None,
                },
                status_code=500,
            )

    async def _score_body(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts, responses = P.parse_score(body, self.limits)
        return {"rewards": self.norm.apply(await self._raw(prompts, responses))}

    async def _compare_body(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.compare(*P.parse_compare(body, self.limits))

    @api.post("/score")
    async def http_score(self, request: Request):
        return await self._http(request, self._score_body)

    @api.post("/compare")
    async def http_compare(self, request: Request):
        return await self._http(request, self._compare_body)

    @api.post("/get_reward")
    async def http_get_reward(self, request: Request):
        return await self._http(request, self._get_reward_body)

    @api.post("/classify")
    async def http_classify(self, request: Request):
        return await self._http(request, self._classify_body)

    @api.post("/pooling")
    async def http_pooling(self, request: Request):
        return await self._http(request, lambda body: self._classify_body(body, pooling=True))

    @api.get("/health")
    async def http_health(self, request: Request):
        # Whether the app is up, for anyone (load balancers, probes); the model, run directory,
        # process and counters only with the token when the server has one.
        if not P.bearer_ok(request.headers.get("authorization"), self._token.get()):
            return JSONResponse({"status": "ok"})
        return JSONResponse(await self.health())


# ---------------------------------------------------------------------------------- building


def deployment_options(s: Any) -> dict[str, Any]:
    """``RewardServer.options(...)`` from a :class:`~mars_ray.config.ServeConfig`: replicas or
    autoscaling, resources per replica, the in-flight request cap."""
    from mars_ray.runtime import worker_env

    opts: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": float(s.num_cpus),
            "num_gpus": float(s.num_gpus),
            "runtime_env": {"env_vars": worker_env()},
        },
        "max_ongoing_requests": int(s.max_ongoing_requests or 2 * s.max_batch_size),
    }
    if s.max_replicas is not None:
        lo = 1 if s.min_replicas is None else int(s.min_replicas)
        hi = int(s.max_replicas)
        opts["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": min(max(int(s.num_replicas), lo, 1), hi),
            "target_ongoing_requests": float(s.target_ongoing_requests or s.max_batch_size),
        }
    else:
        opts["num_replicas"] = int(s.num_replicas)
    return opts


def _threads(s: Any) -> int:
    return int(s.threads) if s.threads is not None else max(1, int(s.num_cpus))


def _model_id(target: P.ServeTarget, cfg: Any) -> str:
    if target.run_dir is not None or os.path.isdir(target.load):
        return target.load
    from mars_ray.models import resolve_model

    return resolve_model(target.load, cache_dir=cfg.model.cache_dir, offline=cfg.model.offline).model_id


def check_app(cfg: Any, model: str | None = None) -> tuple[P.ServeTarget, P.Normalizer, P.Secret]:
    """What :func:`build_app` needs, checked in the caller's process before any Ray starts: the serve
    config, the model reference and its reward head, the normalisation statistics, the token and
    the exposure rule.

    Raises:
        ValueError: a bad serve config, an unresolvable model or one without a reward head,
            normalisation without statistics, a named token variable that is unset, or an
            address other machines reach without a token.
    """
    s = cfg.serve
    problems = s.problems()
    if problems:
        raise ValueError("invalid serve configuration:\n  - " + "\n  - ".join(problems))
    target = P.resolve_target(model or cfg.model.reward)
    from mars_ray.models.resolve import has_reward_head

    if not has_reward_head(target.load, cache_dir=cfg.model.cache_dir, offline=cfg.model.offline):
        from mars_ray.models.reward import MissingRewardHead

        raise MissingRewardHead(
            f"{target.load} has no reward-head weights (none of classifier.weight, classifier.out_proj.weight, "
            "score.weight, or the value_head_prefix weight its config.json names): it is a backbone, and a "
            "server would score with a random head. Serve a trained reward model (mars-ray train writes RUN/model)"
        )
    normalizer = P.make_normalizer(s, target.run_dir, target.load)
    raw_token = P.read_token(s.auth_token_env)
    P.check_exposure(s.host, raw_token, bool(s.allow_unauthenticated))
    return target, normalizer, P.Secret(raw_token)


def build_app(cfg: Any, model: str | None = None):
    """The Serve application for ``model`` (default ``cfg.model.reward``); checks everything that can
    fail early (:func:`check_app`) in the caller's process.

    Raises:
        ValueError: as :func:`check_app`.
    """
    s = cfg.serve
    target, normalizer, token = check_app(cfg, model)
    limits = P.Limits.from_config(s)
    spec = {
        "load": target.load,
        "model_id": _model_id(target, cfg),
        "run_dir": target.run_dir,
        "config_hash": cfg.hash(),
        "seed": int(cfg.seed),
        "dtype": cfg.model.dtype,
        "cache_dir": cfg.model.cache_dir,
        "offline": cfg.model.offline,
        "max_prompt_tokens": int(cfg.data.max_prompt_tokens),
        "max_response_tokens": int(cfg.data.max_response_tokens),
        "forward_batch_size": int(s.forward_batch_size),
        "forward_max_tokens": None if s.forward_max_tokens is None else int(s.forward_max_tokens),
        "max_batch_size": int(s.max_batch_size),
        "batch_wait_timeout_s": float(s.batch_wait_timeout_s),
        "limits": {
            "max_text_chars": limits.max_text_chars,
            "max_batch_items": limits.max_batch_items,
            "max_request_bytes": limits.max_request_bytes,
        },
        "normalizer": {"mean": normalizer.mean, "std": normalizer.std, "source": normalizer.source},
        "token": token,
        "threads": _threads(s),
        "num_gpus": float(s.num_gpus),
    }
    return RewardServer.options(**deployment_options(s)).bind(spec)


def url_of(s: Any) -> str:
    """The base URL clients use (a wildcard host is shown as 127.0.0.1)."""
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def start(cfg: Any, model: str | None = None, app: Any = None):
    """Start Serve's HTTP proxy on ``serve.host:serve.port`` (Ray must be initialised) and deploy the
    app (``app``, or :func:`build_app` of ``model``) as ``serve.app_name`` at ``serve.route_prefix``;
    returns ``(handle, url)`` once the replicas are up.

    When Serve is already running on the cluster its HTTP options stay as they are (Serve ignores
    new ones), so ``url`` is right only for the first application started on a cluster.
    """
    s = cfg.serve
    if app is None:
        app = build_app(cfg, model)
    http = {"host": s.host, "port": int(s.port)}
    if s.request_timeout_s is not None:
        http["request_timeout_s"] = float(s.request_timeout_s)
    serve.start(http_options=http)
    handle = serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    return handle, url_of(s)


def drain(app_name: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Drain every running replica of ``app_name`` (:meth:`RewardServer.drain`): a handle call
    reaches one replica, so calls repeat until each running replica has answered or the time is up.
    Returns the replicas drained, how many were running and what was left in flight."""
    t0 = time.monotonic()
    handle = serve.get_app_handle(app_name)
    try:
        app = serve.status().applications[app_name]
        running = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
    except Exception:  # status unreadable (an older Serve, the app just gone): drain the one we reach
        running = 1
    seen: dict[str, int] = {}
    while len(seen) < max(1, running) and time.monotonic() - t0 < timeout_s:
        left = max(0.5, timeout_s - (time.monotonic() - t0))
        out = handle.drain.remote(left).result(timeout_s=left + 5)
        seen[out["replica"]] = int(out["inflight"])
    return {"replicas": len(seen), "running": running, "inflight": sum(seen.values()), "s": time.monotonic() - t0}


def stop(app_name: str) -> None:
    """Delete ``app_name``; shut Serve down too when no other application is left on the cluster."""
    try:
        serve.delete(app_name)
        left = serve.status().applications
    except Exception:
        left = {}
    if not left:
        serve.shutdown()


def get_handle(app_name: str = "mars-reward"):
    """The DeploymentHandle of a running reward app (from any driver, actor or task on the cluster)."""
    return serve.get_app_handle(app_name)
