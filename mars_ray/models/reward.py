"""Bradley-Terry reward model r(x, y) -> scalar: loading, pair encoding and batched scoring.

Pure torch/transformers (no Ray); :mod:`mars_ray.stages.score` wires it into Ray Data and the
training stage reuses :func:`encode_pairs` / :func:`encode_preferences` / :func:`pad_batch`.

Encoding rule (the project's promise: no pair is ever dropped for length). Prompt and response are
tokenised *without* special tokens, then :func:`mars_ray.core.lengths.truncate_pair_tokens` keeps
the END of the prompt and the START of the response (capped at its limit); if prompt + response +
special tokens would still exceed the model's context (e.g. 512 positions for BERT/MiniLM while
the limits are 512 + 192), the prompt is shortened further from the left. The model's own special
tokens are then added as a pair: ``[CLS] p [SEP] r [SEP]`` for BERT, ``<s> p </s></s> r </s>`` for
RoBERTa, plain ``p r`` for decoder tokenizers, which additionally get a final EOS token.

transformers 5 fast tokenizers no longer have ``build_inputs_with_special_tokens``; when it is
missing the pair template is read off the tokenizer itself (one probe encoding of a sentinel pair,
checked against a second probe), so the result is exactly what ``tokenizer(prompt, response)``
would produce for the same (truncated) token ids.

Chat templates: a backbone whose tokenizer has one (decoder reward models such as Qwen or Llama)
reads every pair as a conversation, the way it was tuned: the stored prompt becomes its messages
(:func:`mars_ray.core.chat.prompt_messages`: transcript turns, else one user turn), the response the
final assistant turn, and the template renders them. The rendered text is cut around the response,
so the same rule applies: the END of the rendered prompt and the START of the response are kept,
and the template's closing tokens follow the response. Encoders have no template and keep the
plain pair formatting above.

Decoder models (Llama/Qwen/SmolLM2-style) pool the rightmost token that is not ``pad_token_id``.
When the pad token *is* the EOS token (SmolLM2, and every tokenizer we give eos-as-pad), that
rightmost token is the last response token (the trailing EOS counts as padding); it has attended
to the whole prompt and response, and right padding cannot change it (causal attention).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mars_ray.core.chat import prompt_messages
from mars_ray.core.lengths import truncate_pair_tokens
from mars_ray.models.precision import final_projection, fp32_head, inference_dtype, native_bf16

__all__ = [
    "Encoded",
    "MissingRewardHead",
    "disable_dropout",
    "encode_pairs",
    "encode_preferences",
    "length_chunks",
    "load_reward_model",
    "native_bf16",
    "pad_batch",
    "resolve_dtype",
    "score_encoded",
    "score_encoded_pairs",
    "score_pairs",
    "score_texts",
    "uses_chat_template",
]

# Tokenizers report a huge sentinel (int(1e30)) when they know no limit.
_NO_LIMIT = 1_000_000


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def generation_dtype(dtype: Any, device: str = "cpu"):
    """A generator's weights dtype: the precision policy's inference dtype
    (:func:`mars_ray.models.precision.inference_dtype`: ``auto`` is bf16 where it is native)."""
    return inference_dtype(dtype, device)


def resolve_dtype(dtype: Any, device: str = "cpu"):
    """A reward model's weights dtype for inference: ``auto`` is bf16 where it is native, else
    fp32 (:func:`mars_ray.models.precision.inference_dtype`); names and torch dtypes pass through."""
    return inference_dtype(dtype, device)


class MissingRewardHead(ValueError):
    """A folder loaded as a reward model has no reward-head weights (it is a backbone)."""


def load_reward_model(
    ref: str,
    *,
    seed: int = 0,
    dtype: Any = "auto",
    device: str = "cpu",
    cache_dir: str | None = None,
    offline: bool | None = None,
    new_head: bool = False,
) -> tuple[Any, Any]:
    """Load ``ref`` as a scalar reward model (``num_labels=1``) and its tokenizer.

    The reward head is read from the checkpoint: transformers' own (``classifier``, ``score``),
    TRL's and PEFT's folders, and OpenRLHF's, whose head sits under its ``value_head_prefix``
    (``config.json``; e.g. ``value_head.weight``) and is read as ``score``. A checkpoint without
    head weights is a backbone: refused (:class:`MissingRewardHead`, naming the keys) unless
    ``new_head`` asks for a new head on purpose (training from a backbone), which is then drawn
    in fp32 from ``seed`` alone, so the same seed gives the same model in any dtype and the
    caller's global RNG is untouched. ``model.config.pad_token_id`` is set to the tokenizer's pad
    id (EOS when the tokenizer has no pad token) and the tokenizer's ``model_max_length`` is capped
    at the model's ``max_position_embeddings``, so :func:`encode_pairs` never exceeds the position
    table.

    Raises:
        ModelResolutionError: ``ref`` cannot be resolved (see :func:`mars_ray.models.resolve_model`).
        MissingRewardHead: no reward-head weights and ``new_head`` is false.
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from mars_ray.models.resolve import load_tokenizer, resolve_model

    resolved = resolve_model(ref, cache_dir=cache_dir, offline=offline)
    tokenizer = load_tokenizer(resolved)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{ref}: the tokenizer has neither a pad nor an EOS token; cannot batch")
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = resolve_dtype(dtype, device)
    extra: dict[str, Any] = {}
    prefix = _value_head_prefix(resolved.path)
    if prefix and prefix != "score":  # OpenRLHF: the head under its value_head_prefix, read as `score`
        extra["key_mapping"] = {rf"^{re.escape(prefix)}\.": "score."}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, num_labels=1, dtype=torch_dtype, output_loading_info=True, **extra
        )
    if prefix is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        _pad_apart_from_eos(tokenizer)  # OpenRLHF reads the reward at the last token, EOS included
    # Padding uses the tokenizer's pad id, so the model's last-non-pad pooling must agree with it.
    model.config.pad_token_id = tokenizer.pad_token_id
    if _text_config(model.config) is not model.config:
        _text_config(model.config).pad_token_id = tokenizer.pad_token_id
    text_cfg = _text_config(model.config)
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0:
        if "roberta" in str(getattr(text_cfg, "model_type", "")):  # positions start at pad_token_id + 1
            max_pos -= int(getattr(text_cfg, "pad_token_id", 1) or 1) + 1
        if int(tokenizer.model_max_length) > max_pos:
            tokenizer.model_max_length = max_pos
    head = fp32_head(model)  # the reward in fp32 whatever the body computes in (models/precision.py)
    name = next(n for n, m in model.named_modules() if m is head)
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(name + "."))
    if missing and not new_head:
        raise MissingRewardHead(
            f"{ref}: no reward-head weights in the checkpoint (missing {', '.join(missing)}; "
            f"{_head_note(info)}): it is a backbone or another kind of model, and its scores would come from a "
            "random head. Serve or evaluate a trained reward model (mars-ray train writes RUN/model); an "
            "OpenRLHF checkpoint names its head in config.json (value_head_prefix)"
        )
    if missing:
        _init_head(model, head, seed)  # a new head on purpose: the same for every dtype
    elif torch_dtype != torch.float32:
        _reload_fp32(head, name, resolved.path)
    model.to(device)
    model.eval()
    return model, tokenizer


def _pad_apart_from_eos(tokenizer: Any) -> None:
    """Pad with a special token other than EOS (and BOS), so transformers' last-non-pad pooling
    reads the reward at the last real token even when it is EOS, where OpenRLHF reads it
    (``RewardModel.forward``: the last position of the attention mask)."""
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    for tid in [tokenizer.unk_token_id, *getattr(tokenizer, "all_special_ids", [])]:
        if tid is not None and tid not in taken:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(tid))
            return
    raise ValueError(
        "an OpenRLHF reward model whose tokenizer pads with its EOS token and has no other special token: "
        "cannot read the reward at the EOS token as OpenRLHF does; add a pad token to the tokenizer"
    )


def _value_head_prefix(folder: str) -> str | None:
    """OpenRLHF's ``value_head_prefix`` from a folder's config.json (None when absent)."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("value_head_prefix")
    except (OSError, ValueError):
        return None
    return str(value) if value else None


def _head_note(info: dict[str, Any]) -> str:
    unexpected = [k for k in info.get("unexpected_keys", ()) if k.count(".") == 1]
    return (
        f"top-level weights it has but this model does not use: {', '.join(sorted(unexpected)[:4])}"
        if unexpected
        else "no other head-like weights either"
    )


def _init_head(model: Any, head: Any, seed: int) -> None:
    """A new reward head, drawn in fp32 from ``seed`` alone (the initialisation transformers uses
    for these heads: weights N(0, initializer_range), bias 0), so a fresh head is the same whatever
    dtype the body was loaded in."""
    import torch

    std = float(getattr(_text_config(model.config), "initializer_range", None) or 0.02)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=torch.float32) * std)
        if head.bias is not None:
            head.bias.zero_()


def _reload_fp32(head: Any, name: str, folder: str) -> None:
    """Read the head's saved weights again as fp32 (loading in bf16 rounded them), from the
    folder's safetensors files (other formats keep the rounded copy)."""
    import json
    from pathlib import Path

    import torch

    want = {f"{name}.{p}": t for p, t in head.named_parameters(recurse=False)}
    root = Path(folder)
    files = sorted(root.glob("*.safetensors"))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({root / weight_map[k] for k in want if k in weight_map})
    if not files:
        return
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in set(want) & set(st.keys()):
                saved = st.get_tensor(key)
                if tuple(saved.shape) == tuple(want[key].shape):
                    with torch.no_grad():
                        want[key].copy_(saved.to(torch.float32))


def disable_dropout(model: Any) -> int:
    """Turn every dropout of ``model`` off (``nn.Dropout`` modules and float attention-dropout
    attributes such as Llama's ``attention_dropout``); returns how many were non-zero.

    Reward models are usually trained without dropout (TRL's RewardTrainer default): the
    Bradley-Terry loss compares two forward passes, which dropout makes noisier; on a CPU it also
    costs about half of a training step (dropout masks, and SDPA attention falls back to its
    unfused path when it has to drop attention weights)."""
    import torch

    changed = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            changed += mod.p > 0
            mod.p = 0.0
        for name in ("attention_dropout", "dropout_prob"):
            v = getattr(mod, name, None)
            if isinstance(v, float) and not isinstance(v, bool):
                changed += v > 0
                setattr(mod, name, 0.0)
    return int(changed)


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Model-ready token ids (special tokens included, not padded), one row per input pair.

    ``token_type_ids`` is None for models that do not take them (decoders, RoBERTa-style).
    ``prompt_truncated`` / ``response_truncated`` count rows whose prompt lost its beginning /
    whose response was capped; no row is ever dropped.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    prompt_truncated: int
    response_truncated: int
    # per row: whether its prompt or its response was cut (None where rows were merged)
    cut: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


@dataclass(frozen=True)
class _PairTemplate:
    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    # token type ids of each part (None when the model takes no token_type_ids)
    types: tuple[tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...]] | None
    eos_id: int | None  # appended when the sequence does not end with it (decoder tokenizers)

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix) + (1 if self.eos_id is not None else 0)


def _wants_token_types(tokenizer: Any) -> bool:
    return "token_type_ids" in (getattr(tokenizer, "model_input_names", None) or [])


def _split_template(full: Sequence[int], a: Sequence[int], b: Sequence[int], n_special: int | None):
    """Find ``full == prefix + a + middle + b + suffix``; returns the three parts' slices or None."""
    full, a, b = list(full), list(a), list(b)
    for i in range(len(full) - len(a) + 1):
        if full[i : i + len(a)] != a:
            continue
        for j in range(i + len(a), len(full) - len(b) + 1):
            if full[j : j + len(b)] != b:
                continue
            parts = ((0, i), (i + len(a), j), (j + len(b), len(full)))
            if n_special is None or sum(e - s for s, e in parts) == n_special:
                return parts
    return None


def _template_from_builder(tokenizer: Any) -> _PairTemplate | None:
    """Template from ``build_inputs_with_special_tokens`` (slow / transformers-4 tokenizers)."""
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    if not callable(build):
        return None
    a, b = [-11, -12], [-21, -22, -23]  # sentinels: never real ids, the builder only concatenates
    try:
        full = list(build(a, b))
    except Exception:
        return None
    parts = _split_template(full, a, b, None)
    if parts is None:
        return None
    prefix, middle, suffix = (tuple(full[s:e]) for s, e in parts)
    types = None
    if _wants_token_types(tokenizer):
        make_types = getattr(tokenizer, "create_token_type_ids_from_sequences", None)
        tt = list(make_types(a, b)) if callable(make_types) else [0] * (len(full) - len(b)) + [1] * len(b)
        types = _split_types(tt, parts, len(a), len(b))
    return _PairTemplate(prefix, middle, suffix, types, None)


def _split_types(tt: Sequence[int], parts, na: int, nb: int):
    (p0, p1), (m0, m1), (s0, s1) = parts
    ta = set(tt[p1 : p1 + na])
    tb = set(tt[m1 : m1 + nb])
    if len(ta) != 1 or len(tb) != 1:
        return None
    return (tuple(tt[p0:p1]), ta.pop(), tuple(tt[m0:m1]), tb.pop(), tuple(tt[s0:s1]))


_PROBES = (("hello there", "world peace"), ("one two three", "four five"))


def _template_from_probe(tokenizer: Any) -> _PairTemplate:
    """Template read off ``tokenizer(a, b)`` for sentinel texts, verified on a second probe."""
    want_types = _wants_token_types(tokenizer)
    try:
        n_special = int(tokenizer.num_special_tokens_to_add(pair=True))
    except Exception:
        n_special = None
    found = None
    for text_a, text_b in _PROBES:
        a = tokenizer(text_a, add_special_tokens=False)["input_ids"]
        b = tokenizer(text_b, add_special_tokens=False)["input_ids"]
        enc = tokenizer(text_a, text_b, add_special_tokens=True, return_token_type_ids=want_types)
        full = list(enc["input_ids"])
        parts = _split_template(full, a, b, n_special)
        if parts is None:
            raise ValueError(
                f"cannot read the pair template of {type(tokenizer).__name__}: {text_a!r}+{text_b!r} encodes to {full}"
            )
        prefix, middle, suffix = (tuple(full[s:e]) for s, e in parts)
        types = _split_types(list(enc["token_type_ids"]), parts, len(a), len(b)) if want_types else None
        if want_types and types is None:
            raise ValueError(f"{type(tokenizer).__name__}: token type ids are not constant per segment")
        t = (prefix, middle, suffix, types)
        if found is not None and found != t:
            raise ValueError(f"{type(tokenizer).__name__}: the pair template differs between probes")
        found = t
    return _PairTemplate(*found, None)


def _pair_template(tokenizer: Any) -> _PairTemplate:
    """How ``tokenizer`` joins a (prompt, response) pair, plus the EOS rule for decoder tokenizers."""
    t = _template_from_builder(tokenizer) or _template_from_probe(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    # Decoder tokenizers add nothing after the response: the sequence must end with EOS.
    if not t.suffix and eos is not None:
        t = _PairTemplate(t.prefix, t.middle, t.suffix, t.types, int(eos))
    return t


def _max_length(tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        return int(max_length)
    m = getattr(tokenizer, "model_max_length", None)
    return int(m) if isinstance(m, int) and 0 < m < _NO_LIMIT else None


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """One batched call, no special tokens, no truncation (the pair rule truncates)."""
    if len(texts) == 0:
        return []
    return tokenizer(
        list(texts),
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]


def _assemble(
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    max_length: int | None,
) -> Encoded:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    t = _pair_template(tokenizer)
    limit = _max_length(tokenizer, max_length)
    n_special = t.n_special
    resp_cap = max_response_tokens
    if limit is not None:
        if limit - n_special < 1:
            raise ValueError(f"max_length {limit} leaves no room for a response ({n_special} special tokens)")
        resp_cap = min(resp_cap, limit - n_special)
    prefix, middle, suffix = list(t.prefix), list(t.middle), list(t.suffix)
    ids_out: list[list[int]] = []
    types_out: list[list[int]] | None = [] if t.types is not None else None
    cuts: list[bool] = []
    n_p = n_r = 0
    for p, r in zip(prompt_ids, response_ids):
        p_cap = max_prompt_tokens
        if limit is not None:
            p_cap = max(0, min(p_cap, limit - n_special - min(len(r), resp_cap)))
        cut = truncate_pair_tokens(p, r, p_cap, resp_cap)
        n_p += cut.prompt_truncated
        n_r += cut.response_truncated
        cuts.append(bool(cut.prompt_truncated or cut.response_truncated))
        ids = prefix + cut.prompt_ids + middle + cut.response_ids + suffix
        eos_added = t.eos_id is not None and (not ids or ids[-1] != t.eos_id)
        if eos_added:
            ids.append(t.eos_id)
        ids_out.append(ids)
        if types_out is not None:
            tp, ta, tm, tb, ts = t.types
            tt = [*tp, *([ta] * len(cut.prompt_ids)), *tm, *([tb] * len(cut.response_ids)), *ts]
            if eos_added:
                tt.append(tb)
            types_out.append(tt)
    return Encoded(ids_out, types_out, n_p, n_r, cuts)


# Stands for the response while a chat template renders a conversation (letters only: templates
# may strip or escape whitespace and punctuation around message content).
_RESPONSE_SENTINEL = "MARSRAYRESPONSESENTINELQZX"


def uses_chat_template(tokenizer: Any) -> bool:
    """Whether pairs are formatted with the tokenizer's chat template (it has one)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_frame(tokenizer: Any, prompt: str) -> tuple[str, str]:
    """(text before the response, text after it) of ``prompt`` answered by one assistant turn,
    rendered with the tokenizer's chat template."""
    messages = prompt_messages(prompt) or [{"role": "user", "content": ""}]
    messages.append({"role": "assistant", "content": _RESPONSE_SENTINEL})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if text.count(_RESPONSE_SENTINEL) != 1:
        raise ValueError(
            f"{type(tokenizer).__name__}: its chat template does not render an assistant message's content "
            "exactly once; it cannot format reward-model pairs"
        )
    head, tail = text.split(_RESPONSE_SENTINEL)
    return head, tail


def _assemble_chat(
    tokenizer: Any,
    prompts: Sequence[str],
    response_ids: Sequence[Sequence[int]],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    max_length: int | None,
) -> Encoded:
    frames = {p: chat_frame(tokenizer, p) for p in dict.fromkeys(prompts)}
    heads = dict(zip(frames, _tokenize(tokenizer, [h for h, _ in frames.values()])))
    tails = dict(zip(frames, _tokenize(tokenizer, [t for _, t in frames.values()])))
    limit = _max_length(tokenizer, max_length)
    ids_out: list[list[int]] = []
    cuts: list[bool] = []
    n_p = n_r = 0
    for p, r in zip(prompts, response_ids):
        tail = tails[p]
        resp_cap = max_response_tokens
        p_cap = max_prompt_tokens
        if limit is not None:
            if limit - len(tail) < 1:
                raise ValueError(f"max_length {limit} leaves no room for a response after the chat template")
            resp_cap = min(resp_cap, limit - len(tail))
            p_cap = max(0, min(p_cap, limit - len(tail) - min(len(r), resp_cap)))
        cut = truncate_pair_tokens(heads[p], r, p_cap, resp_cap)
        n_p += cut.prompt_truncated
        n_r += cut.response_truncated
        cuts.append(bool(cut.prompt_truncated or cut.response_truncated))
        ids_out.append(list(cut.prompt_ids) + list(cut.response_ids) + list(tail))
    return Encoded(ids_out, None, n_p, n_r, cuts)


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    max_length: int | None = None,
) -> Encoded:
    """Encode (prompt, response) pairs for a reward model; never drops a pair.

    Args:
        tokenizer: a (fast) Hugging Face tokenizer; each list is tokenised in one call.
        max_prompt_tokens: keep at most this many tokens from the END of the prompt.
        max_response_tokens: keep at most this many tokens from the START of the response.
        max_length: total length limit including special tokens; ``None`` uses
            ``tokenizer.model_max_length`` (capped at the model's positions by
            :func:`load_reward_model`). When needed the prompt is shortened further (from the left).

    Returns:
        :class:`Encoded` with one row per pair, in input order.
    """
    kw = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens, max_length=max_length)
    if uses_chat_template(tokenizer):
        return _assemble_chat(tokenizer, list(prompts), _tokenize(tokenizer, responses), **kw)
    return _assemble(tokenizer, _tokenize(tokenizer, prompts), _tokenize(tokenizer, responses), **kw)


def encode_preferences(
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    max_length: int | None = None,
) -> tuple[Encoded, Encoded]:
    """``(encode_pairs(prompts, chosen), encode_pairs(prompts, rejected))`` with each prompt
    tokenised once and all responses in one tokenizer call."""
    n = len(prompts)
    if not (len(chosen) == len(rejected) == n):
        raise ValueError(f"{n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    r_ids = _tokenize(tokenizer, [*chosen, *rejected])
    kw = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens, max_length=max_length)
    if uses_chat_template(tokenizer):
        prompts = list(prompts)
        return (
            _assemble_chat(tokenizer, prompts, r_ids[:n], **kw),
            _assemble_chat(tokenizer, prompts, r_ids[n:], **kw),
        )
    p_ids = _tokenize(tokenizer, prompts)
    return (
        _assemble(tokenizer, p_ids, r_ids[:n], **kw),
        _assemble(tokenizer, p_ids, r_ids[n:], **kw),
    )


def pad_batch(
    input_ids: Sequence[Sequence[int]],
    token_type_ids: Sequence[Sequence[int]] | None,
    pad_token_id: int,
) -> dict[str, Any]:
    """Right-pad to the longest row: ``input_ids``, ``attention_mask`` (and ``token_type_ids``)
    as int64 torch tensors."""
    import torch

    n = len(input_ids)
    width = max((len(x) for x in input_ids), default=0)
    ids = np.full((n, width), pad_token_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64) if token_type_ids is not None else None
    for i, row in enumerate(input_ids):
        k = len(row)
        ids[i, :k] = row
        mask[i, :k] = 1
        if types is not None:
            types[i, :k] = token_type_ids[i]
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    return out


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def length_chunks(lengths: np.ndarray, *, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices of ``lengths``, longest first, cut into forward batches of at most ``batch_size``
    rows whose padded size (rows x longest row) stays within ``max_tokens`` token slots (a row
    longer than that forms its own batch); ``max_tokens`` None: ``batch_size`` rows each.

    A few requests of very different lengths (a served batch) then pad and attend over far fewer
    slots: the longest go in small batches, the short ones in large ones.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError("max_tokens must be >= 1 (or None)")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if max_tokens is None:
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    chunks, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order):
            chunks.append(order[start:])
            break
        rows, width = i - start + 1, int(lengths[order[start]])
        if rows > batch_size or rows * width > max_tokens:
            chunks.append(order[start:i])
            start = i
    return chunks


def score_encoded(
    model: Any, tokenizer: Any, enc: Encoded, *, batch_size: int, max_tokens: int | None = None
) -> np.ndarray:
    """Rewards (float32, input order) of encoded sequences: longest first, forward batches of
    :func:`length_chunks` (``batch_size`` rows, ``max_tokens`` token slots), each padded only to
    its own longest row."""
    import torch

    n = len(enc)
    chunks = length_chunks(enc.lengths, batch_size=batch_size, max_tokens=max_tokens)
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (load the model with load_reward_model)")
    device = next(model.parameters()).device
    with torch.inference_mode():
        for idx in chunks:
            batch = pad_batch(
                [enc.input_ids[i] for i in idx],
                [enc.token_type_ids[i] for i in idx] if enc.token_type_ids is not None else None,
                pad_id,
            )
            if device.type != "cpu":
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = model(**batch).logits
            out[idx] = logits[:, 0].float().cpu().numpy()
    return out


def score_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int,
    max_prompt_tokens: int,
    max_response_tokens: int,
    max_length: int | None = None,
    max_tokens: int | None = None,
) -> np.ndarray:
    """r(prompt_i, response_i) for every i as float32, in input order (forward batches as
    :func:`score_encoded`)."""
    enc = encode_pairs(
        tokenizer,
        prompts,
        responses,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        max_length=max_length,
    )
    return score_encoded(model, tokenizer, enc, batch_size=batch_size, max_tokens=max_tokens)


def score_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    batch_size: int,
    max_prompt_tokens: int,
    max_response_tokens: int,
    max_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(r_chosen, r_rejected)`` (float32, input order) in one length-sorted pass over all 2n
    sequences; the margin is ``r_chosen - r_rejected``."""
    enc_c, enc_r = encode_preferences(
        tokenizer,
        prompts,
        chosen,
        rejected,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        max_length=max_length,
    )
    return score_encoded_pairs(model, tokenizer, enc_c, enc_r, batch_size=batch_size)


def score_encoded_pairs(
    model: Any, tokenizer: Any, enc_c: Encoded, enc_r: Encoded, *, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(r_chosen, r_rejected)`` of pairs encoded by :func:`encode_preferences`, in one
    length-sorted pass over all 2n sequences."""
    both = Encoded(
        enc_c.input_ids + enc_r.input_ids,
        (enc_c.token_type_ids + enc_r.token_type_ids) if enc_c.token_type_ids is not None else None,
        enc_c.prompt_truncated + enc_r.prompt_truncated,
        enc_c.response_truncated + enc_r.response_truncated,
    )
    r = score_encoded(model, tokenizer, both, batch_size=batch_size)
    n = len(enc_c)
    return r[:n], r[n:]


def score_with_features(model: Any, tokenizer: Any, enc: Encoded, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and the final features φ (the input of the reward head, at the token the model
    pools: BERT-style heads see one vector per sequence, decoder heads the last real token), in
    input order. The head is linear, so ``reward = φ·w + b``."""
    import torch

    n = len(enc)
    head = final_projection(model)
    feats = np.empty((n, head.in_features), dtype=np.float32)
    rewards = np.empty(n, dtype=np.float32)
    if n == 0:
        return rewards, feats
    captured: list[Any] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    order = np.argsort(-enc.lengths, kind="stable")
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = pad_batch(
                    [enc.input_ids[i] for i in idx],
                    [enc.token_type_ids[i] for i in idx] if enc.token_type_ids is not None else None,
                    tokenizer.pad_token_id,
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                captured.clear()
                rewards[idx] = model(**batch).logits[:, 0].float().cpu().numpy()
                phi = captured[-1].float()
                if phi.dim() == 3:
                    # Decoder: one vector per token; transformers reads the reward at the last
                    # token that is not the pad id (with pad = EOS, before a trailing EOS).
                    ids = batch["input_ids"]
                    pad = getattr(model.config, "pad_token_id", None)
                    if pad is None:
                        last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
                    else:
                        pos = torch.arange(ids.shape[1], device=ids.device)
                        last = (pos * (ids != pad)).argmax(dim=-1)
                    phi = phi[torch.arange(phi.shape[0], device=phi.device), last]
                feats[idx] = phi.cpu().numpy()
    finally:
        hook.remove()
    return rewards, feats
