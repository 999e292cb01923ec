"""The pure part of reward serving: request validation, query splitting, normalisation, what to load.

No Ray, no torch, no FastAPI: everything here is plain Python, so it is unit-tested without a
cluster, and the deployment (:mod:`mars_ray.serve.app`), the HTTP client
(:mod:`mars_ray.serve.client`) and the CLI share one definition of the wire format.

Wire format (JSON; every text is a string, every list at most ``serve.max_batch_items`` long, every
text at most ``serve.max_text_chars`` characters):

- ``POST /score``: ``{"prompts": [str], "responses": [str]}`` (equal lengths) -> ``{"rewards": [float]}``
- ``POST /compare``: ``{"prompt": str, "chosen": str, "rejected": str}`` ->
  ``{"chosen_reward", "rejected_reward", "margin", "probability", "normalized"}``
- ``POST /get_reward`` (OpenRLHF's remote reward-model schema): ``{"query": [str],
  "prompts": [str] | null, "labels": any}`` -> ``{"rewards": [float], "scores": [float], "extra_logs": {...}}``
  (``scores`` repeats ``rewards``, as OpenRLHF's own server does); or ``{"messages": [[{"role",
  "content"}, ...], ...]}``, one conversation per item ending with the assistant reply to score.
  An empty list is answered with empty lists (OpenRLHF 0.9.1-0.11.0 send one to every extra URL).
- ``POST /classify`` and ``POST /pooling`` (vLLM's pooling API, which verl's reward loop calls):
  ``{"model"?, "input": str | [str]}`` or ``{"messages": [...]}`` -> ``{"id", "object": "list",
  "created", "model", "data": [{"index", "label", "probs": [p], "num_classes": 1}], "usage"}``
  (``/pooling``: ``data: [{"index", "object": "pooling", "data": [r]}]``); ``p`` is sigmoid(r)
  unless ``"use_activation": false`` asks for the raw reward, as vLLM does for a one-label model.
- ``GET /health`` -> ``{"status": "ok"}``; with the token (or without auth) also ``"model_id",
  "config_hash", "normalized", ...``

``/compare``: ``margin = r(prompt, chosen) - r(prompt, rejected)`` on the model's raw scale and
``probability = sigmoid(margin)``, the Bradley-Terry probability that ``chosen`` is preferred; with
``serve.normalize`` the two rewards are normalised, the margin and probability are not (the
Bradley-Terry probability is defined on the raw scale the model was trained on).

``/get_reward`` (:func:`query_item`): OpenRLHF sends whole texts as ``query``: the policy's chat
template applied to the prompt, the generated response and, when generation stopped on its own,
the end-of-turn token; recent versions also send the prompts as ``prompts`` (and ``labels``, which
a reward model does not use and which is ignored, as are unknown fields). Each query is read back
into the conversation it renders (:func:`mars_ray.core.chat_formats.parse_rendered`: ChatML, Llama
3, Gemma, Mistral ``[INST]``, Phi, HH transcripts) and scored in the reward model's own format, as
``/score`` scores that conversation (:func:`~mars_ray.core.chat.messages_to_prompt`, then the
model's chat template or its text pair): a template is never wrapped in another. An HH transcript
keeps its own text up to its last ``Assistant:`` turn as the prompt. A query in no known format is
plain text: split at ``prompts[i]`` when it starts with it, else scored whole as the response to an
empty prompt, and counted. Per query, ``extra_logs`` says which format was read (``format_<family>``,
1.0 or 0.0), whether the query was split into a prompt and a response (``query_split``) and whether
the model's token limits cut it (``truncated``: the prompt keeps its end and the response its start,
the rule training uses); like every ``extra_logs`` entry it has one value per query.

Long inputs are answered, not refused: a text beyond the model's context is truncated by the
training rule, and a request of many items is scored in chunks. The limits that remain are caps
against abuse, far above real rollouts: ``serve.max_text_chars`` characters per text,
``serve.max_batch_items`` items and ``serve.max_request_bytes`` bytes per request.

Errors are JSON ``{"error": message, "field": "responses[3]" | null}`` with a 4xx status: 400
malformed JSON, 401 missing or wrong bearer token, 413 a body, a list or a text over its cap,
422 a missing field, a wrong type, an empty ``/score`` list or lists of different lengths. Messages
name the field (and index) and say what was expected.
"""

from __future__ import annotations

import difflib
import hmac
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mars_ray.core.chat import ASSISTANT, messages_to_prompt, split_last_assistant
from mars_ray.core.chat_formats import FAMILIES, parse_rendered
from mars_ray.core.validation import RowError

__all__ = [
    "Limits",
    "Normalizer",
    "RequestError",
    "RewardItem",
    "ServeTarget",
    "bearer_ok",
    "json_type",
    "parse_classify",
    "parse_compare",
    "parse_get_reward",
    "parse_json_body",
    "parse_score",
    "query_item",
    "resolve_target",
    "reward_logs",
    "reward_stats",
    "sigmoid",
]

RUN_MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"


class RequestError(ValueError):
    """A request the server will not score; ``status`` is the HTTP status, ``field`` what is wrong."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = int(status)

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}

    def __reduce__(self):  # keep field and status across Ray's pickling (DeploymentHandle callers)
        return (_rebuild_request_error, (self.message, self.field, self.status))


def _rebuild_request_error(message: str, field: str | None, status: int) -> RequestError:
    return RequestError(message, field=field, status=status)


@dataclass(frozen=True)
class Limits:
    """Per-request limits (``serve.max_text_chars``, ``serve.max_batch_items``, ``serve.max_request_bytes``)."""

    max_text_chars: int = 1_000_000
    max_batch_items: int = 16384
    max_request_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_config(cls, serve_cfg: Any) -> Limits:
        return cls(int(serve_cfg.max_text_chars), int(serve_cfg.max_batch_items), int(serve_cfg.max_request_bytes))


# ----------------------------------------------------------------------------------- validation


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_json_body(raw: bytes, limits: Limits) -> dict[str, Any]:
    """Decode a request body into a JSON object.

    Raises:
        RequestError: 413 over ``max_request_bytes``; 400 not UTF-8 / not JSON / not an object.
    """
    if len(raw) > limits.max_request_bytes:
        raise body_too_large(len(raw), limits)
    if not raw.strip():
        raise RequestError("the request body is empty: send a JSON object", status=400)
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 encoded JSON", status=400) from None
    except ValueError as e:  # json.JSONDecodeError
        raise RequestError(f"the request body is not valid JSON: {e}", status=400) from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply to be a valid request", status=400) from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}", status=400)
    return body


def body_too_large(size: int, limits: Limits) -> RequestError:
    return RequestError(
        f"the request body has {size} bytes or more; at most {limits.max_request_bytes} are accepted "
        "(serve.max_request_bytes): send fewer or shorter texts per request",
        status=413,
    )


def _check_fields(body: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str]) -> None:
    unknown = [k for k in body if k not in allowed]
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the fields are {', '.join(allowed)}"
        raise RequestError(f"unknown field {key!r}{hint}", field=str(key))
    for key in required:
        if key not in body:
            raise RequestError(f"missing field {key!r}", field=key)


def check_text(value: Any, field: str, limits: Limits) -> str:
    """A string of at most ``max_text_chars`` characters (empty allowed)."""
    if not isinstance(value, str):
        raise RequestError(f"{field}: expected a string, got {json_type(value)}", field=field)
    if len(value) > limits.max_text_chars:
        raise RequestError(
            f"{field} has {len(value)} characters; at most {limits.max_text_chars} are accepted (serve.max_text_chars)",
            field=field,
            status=413,
        )
    return value


def check_text_list(value: Any, field: str, limits: Limits, *, allow_empty: bool = False) -> list[str]:
    """A list of at most ``max_batch_items`` strings, each within ``max_text_chars``; non-empty
    unless ``allow_empty``."""
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{field}: expected an array of strings, got {json_type(value)}", field=field)
    if len(value) == 0 and not allow_empty:
        raise RequestError(f"{field} is empty: send at least one item", field=field)
    if len(value) > limits.max_batch_items:
        raise RequestError(
            f"{field} has {len(value)} items; at most {limits.max_batch_items} per request "
            "(serve.max_batch_items): split it into several requests",
            field=field,
            status=413,
        )
    return [check_text(v, f"{field}[{i}]", limits) for i, v in enumerate(value)]


def _same_length(a: Sequence[Any], name_a: str, b: Sequence[Any], name_b: str) -> None:
    if len(a) != len(b):
        raise RequestError(
            f"{name_a} has {len(a)} items but {name_b} has {len(b)}; they must be the same length "
            f"({name_a}[i] goes with {name_b}[i])",
            field=name_b,
        )


def parse_score(body: Mapping[str, Any], limits: Limits) -> tuple[list[str], list[str]]:
    """``{"prompts": [...], "responses": [...]}`` -> ``(prompts, responses)``."""
    _check_fields(body, ("prompts", "responses"), ("prompts", "responses"))
    prompts = check_text_list(body["prompts"], "prompts", limits)
    responses = check_text_list(body["responses"], "responses", limits)
    _same_length(prompts, "prompts", responses, "responses")
    return prompts, responses


def parse_compare(body: Mapping[str, Any], limits: Limits) -> tuple[str, str, str]:
    """``{"prompt": str, "chosen": str, "rejected": str}`` -> the three texts."""
    names = ("prompt", "chosen", "rejected")
    _check_fields(body, names, names)
    prompt, chosen, rejected = (check_text(body[k], k, limits) for k in names)
    return prompt, chosen, rejected


@dataclass(frozen=True)
class RewardItem:
    """One thing to score: the reward model's (prompt, response), the format the input was in
    (:data:`mars_ray.core.chat_formats.FAMILIES`, or ``messages``), and whether a prompt was split
    off (False: the whole text is scored as a response to an empty prompt)."""

    prompt: str
    response: str
    family: str
    split: bool


def query_item(query: str, prompt: str | None = None) -> RewardItem:
    """A rendered ``prompt + response`` text (OpenRLHF's ``query``) as what the reward model
    reads (see the module docstring)."""
    parsed = parse_rendered(query)
    if parsed.family == "hh":
        cut = query.rfind(ASSISTANT)
        if cut >= 0:  # the transcript's own text, as HH-RLHF prompts are stored
            end = cut + len(ASSISTANT)
            return RewardItem(query[:end], query[end:].lstrip(" "), "hh", True)
    if parsed.family != "plain":
        return RewardItem(messages_to_prompt(parsed.messages), parsed.response, parsed.family, True)
    if prompt and query.startswith(prompt):
        return RewardItem(prompt, query[len(prompt) :], "plain", True)
    return RewardItem("", query, "plain", False)


def conversation_item(messages: Any, field: str, limits: Limits) -> RewardItem:
    """A conversation ending with the assistant reply to score, as a :class:`RewardItem`."""
    try:
        before, reply = split_last_assistant(messages, field)
    except RowError as e:
        raise RequestError(f"{field}: {e.reason}", field=field) from None
    for i, m in enumerate(messages):
        check_text(m["content"], f"{field}[{i}].content", limits)
    return RewardItem(messages_to_prompt(before), reply, "messages", True)


def parse_get_reward(body: Mapping[str, Any], limits: Limits) -> list[RewardItem]:
    """OpenRLHF's ``{"query": [...], "prompts": [...] | null, "labels": ...}``, or
    ``{"messages": [conversation, ...]}`` -> one :class:`RewardItem` per item (an empty list is
    allowed). Unknown fields and ``labels`` are ignored (OpenRLHF adds fields over time)."""
    if "messages" in body and "query" not in body:
        convs = body["messages"]
        if not isinstance(convs, (list, tuple)):
            raise RequestError(
                f"messages: expected an array of conversations, got {json_type(convs)}", field="messages"
            )
        if len(convs) > limits.max_batch_items:
            check_text_list(list(convs), "messages", limits)  # raises the 413 with its message
        return [conversation_item(c, f"messages[{i}]", limits) for i, c in enumerate(convs)]
    if "query" not in body:
        raise RequestError(
            "missing field 'query' (the full prompt + response texts) or 'messages' (conversations)", field="query"
        )
    queries = check_text_list(body["query"], "query", limits, allow_empty=True)
    prompts = body.get("prompts")
    if prompts is not None:
        prompts = check_text_list(prompts, "prompts", limits, allow_empty=True)
        _same_length(queries, "query", prompts, "prompts")
    return [query_item(q, prompts[i] if prompts is not None else None) for i, q in enumerate(queries)]


def parse_classify(body: Mapping[str, Any], limits: Limits) -> tuple[list[RewardItem], bool, str | None]:
    """vLLM's pooling request (``/classify``, ``/pooling``): ``{"model"?, "input": str | [str],
    "use_activation"?}`` or ``{"messages": conversation}`` -> the items, whether to apply the
    sigmoid (vLLM's default for a one-label model) and the model name asked for. Unknown fields are
    ignored, as vLLM ignores them; ``normalize`` is refused as vLLM refuses it."""
    if "normalize" in body:
        raise RequestError(
            "'normalize' is not a field of this API: use 'use_activation'", field="normalize", status=400
        )
    activation = body.get("use_activation")
    if activation is None:
        activation = body.get("activation", True)  # the name before vLLM 0.11.2
    if not isinstance(activation, bool):
        raise RequestError(
            f"use_activation: expected true or false, got {json_type(activation)}", field="use_activation"
        )
    model = body.get("model")
    if "messages" in body and "input" not in body:
        return [conversation_item(body["messages"], "messages", limits)], activation, model
    if "input" not in body:
        raise RequestError("missing field 'input' (a text or a list of texts) or 'messages'", field="input")
    texts = body["input"]
    texts = [check_text(texts, "input", limits)] if isinstance(texts, str) else check_text_list(texts, "input", limits)
    return [query_item(t) for t in texts], activation, model


def reward_logs(items: Sequence[RewardItem], truncated: Sequence[bool]) -> dict[str, list[float]]:
    """``extra_logs`` of ``/get_reward``: one value per query under every key."""
    logs = {f"format_{f}": [1.0 if it.family == f else 0.0 for it in items] for f in (*FAMILIES, "messages")}
    logs["query_split"] = [1.0 if it.split else 0.0 for it in items]
    logs["truncated"] = [1.0 if t else 0.0 for t in truncated]
    return logs


def validate_pairs(prompts: Any, responses: Any, limits: Limits) -> tuple[list[str], list[str]]:
    """The same checks as ``POST /score`` for the DeploymentHandle API."""
    return parse_score({"prompts": prompts, "responses": responses}, limits)


# ----------------------------------------------------------------------------------- auth


def bearer_ok(header: str | None, token: str | None) -> bool:
    """True when no token is configured, or ``header`` is ``Bearer <token>`` (constant-time compare)."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))


def read_token(env_name: str | None) -> str | None:
    """The bearer token from the environment variable ``env_name`` (None: auth off).

    Raises:
        ValueError: the variable is named but unset or empty (the value is never printed).
    """
    if env_name is None:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise ValueError(
            f"serve.auth_token_env={env_name!r} but the environment variable {env_name} is unset or empty: "
            f"export {env_name}=<a long random secret>, or set serve.auth_token_env null for no auth"
        )
    return value.strip()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:  # a host name other than localhost, or a wildcard: other machines may reach it
        return False


def check_exposure(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve on an address other machines can reach without a bearer token.

    Raises:
        ValueError: ``host`` is not loopback, no token is set and ``allow_unauthenticated`` is false.
    """
    if token is None and not allow_unauthenticated and not is_loopback(host):
        raise ValueError(
            f"serve.host={host} accepts connections from other machines, but no token is set: set "
            "serve.auth_token_env to the name of an environment variable holding a bearer token, bind to "
            "127.0.0.1, or set serve.allow_unauthenticated true on a trusted network"
        )


class Secret:
    """A string that does not show itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret(set)" if self._value is not None else "Secret(none)"

    __str__ = __repr__


# ----------------------------------------------------------------------------------- math


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Normalizer:
    """``(r - mean) / std``; the identity when ``mean`` is None."""

    mean: float | None = None
    std: float | None = None
    source: str = "none"

    @property
    def enabled(self) -> bool:
        return self.mean is not None

    def apply(self, rewards: Sequence[float]) -> list[float]:
        if self.mean is None:
            return [float(r) for r in rewards]
        return [(float(r) - self.mean) / self.std for r in rewards]  # type: ignore[operator]


# ----------------------------------------------------------------------------------- what to load


@dataclass(frozen=True)
class ServeTarget:
    """What ``--model`` points to: ``load`` goes to ``load_reward_model``; ``run_dir`` is the training
    run it came from (None for a plain folder, a hub id or a builtin)."""

    ref: str
    load: str
    run_dir: str | None


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def resolve_target(ref: str) -> ServeTarget:
    """``RUN_DIR`` -> ``RUN_DIR/model``; ``RUN_DIR/model`` keeps its run; anything else loads as given.

    A run directory is a directory with a ``model/`` Hugging Face folder in it (``mars-ray train``
    writes ``model/``, ``config.yaml`` and ``metrics.jsonl``).

    Raises:
        ValueError: a directory that is neither a model folder nor a run directory with ``model/``.
    """
    p = Path(os.path.expanduser(ref))
    if p.is_dir():
        if _is_model_dir(p / RUN_MODEL_DIR):
            return ServeTarget(ref, str((p / RUN_MODEL_DIR).resolve()), str(p.resolve()))
        if _is_model_dir(p):
            parent = p.resolve().parent
            run = str(parent) if p.name == RUN_MODEL_DIR and (parent / METRICS_FILE).is_file() else None
            return ServeTarget(ref, str(p.resolve()), run)
        if (p / METRICS_FILE).is_file() or (p / "config.yaml").is_file():
            raise ValueError(
                f"{ref} looks like a run directory but has no {RUN_MODEL_DIR}/ model folder yet "
                "(the run has not finished: serve an epoch's model directory instead)"
            )
    return ServeTarget(ref, ref, None)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pooled_stats(row: Mapping[str, Any], prefix: str) -> tuple[float, float, int] | None:
    """Mean and std of all rewards (chosen and rejected pooled) from a metrics row's
    ``{prefix}_chosen_mean/_std`` and ``{prefix}_rejected_mean/_std`` (population stds over the same
    ``{prefix}_n`` pairs); None when they are missing or not finite."""
    keys = [f"{prefix}_{s}_{m}" for s in ("chosen", "rejected") for m in ("mean", "std")]
    if not all(_finite(row.get(k)) for k in keys):
        return None
    cm, cs, rm, rs = (float(row[k]) for k in keys)
    raw_n = row.get(f"{prefix}_n")
    n = int(raw_n) if raw_n is not None and _finite(raw_n) else 0
    if raw_n is not None and _finite(raw_n) and raw_n <= 0:
        return None
    mean = (cm + rm) / 2.0
    var = (cs * cs + cm * cm + rs * rs + rm * rm) / 2.0 - mean * mean
    std = math.sqrt(max(var, 0.0))
    return mean, std, n


def reward_stats(run_dir: str | None) -> tuple[float, float, str]:
    """``(mean, std, source)`` of the rewards of a run's final model: the last row of
    ``metrics.jsonl``, its validation statistics, else its test statistics.

    Raises:
        ValueError: no run directory, no metrics, or no usable statistics (says what to do).
    """
    fix = "set serve.norm_mean and serve.norm_std explicitly, or turn serve.normalize off"
    if run_dir is None:
        raise ValueError(
            "serve.normalize is on but the model is not a training run directory, so there are no "
            f"recorded reward statistics: serve RUN_DIR (with {METRICS_FILE}) instead, or {fix}"
        )
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise ValueError(f"serve.normalize is on but {path} does not exist; {fix}") from None
    if not lines:
        raise ValueError(f"serve.normalize is on but {path} is empty; {fix}")
    try:
        row = json.loads(lines[-1])
    except ValueError as e:
        raise ValueError(f"serve.normalize is on but the last line of {path} is not JSON ({e}); {fix}") from None
    for prefix in ("val", "test"):
        got = pooled_stats(row, prefix)
        if got is None:
            continue
        mean, std, n = got
        if not std > 0:
            raise ValueError(f"{path}: the {prefix} rewards have standard deviation 0; cannot normalise; {fix}")
        return mean, std, f"{path} epoch {row.get('epoch')} {prefix} rewards (n={n} pairs)"
    raise ValueError(
        f"serve.normalize is on but {path} (last row) has no val_/test_ chosen_mean, chosen_std, "
        f"rejected_mean, rejected_std; {fix}"
    )


def make_normalizer(serve_cfg: Any, run_dir: str | None, model_dir: str | None = None) -> Normalizer:
    """The normaliser the config asks for: explicit norm_mean/std, else the model's own statistics
    (``mean``/``std`` in its ``config.json``, as mars-ray train and OpenRLHF write them), else the
    run's recorded validation/test statistics."""
    if not serve_cfg.normalize:
        return Normalizer()
    if serve_cfg.norm_mean is not None and serve_cfg.norm_std is not None:
        return Normalizer(float(serve_cfg.norm_mean), float(serve_cfg.norm_std), "serve.norm_mean/norm_std")
    if model_dir is not None and Path(model_dir).is_dir():
        from mars_ray.models.reward_stats import read_reward_statistics

        own = read_reward_statistics(model_dir)
        if own is not None:
            return Normalizer(own[0], own[1], f"{Path(model_dir) / 'config.json'} mean/std")
    mean, std, source = reward_stats(run_dir)
    return Normalizer(mean, std, source)
