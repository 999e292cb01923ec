"""Greedy decoding of many prompts at once for decoder-only transformers: a shared prompt prefix
is computed once, and rows leave the batch as soon as they end.

``model.generate`` runs a batch as one block: every row is recomputed at every step until the
last row ends, and a prompt template shared by all rows is prefilled once per row. For the
paraphrase and rewrite requests of an epoch (one template, texts of very different lengths, on a
CPU where a step costs about the same for 1 or 32 rows) both are most of the work. This module
drives the model's own forward pass and KV cache (``DynamicCache``) differently:

1. the longest token prefix common to every row is run once and its cache repeated per row;
2. each row's remaining prompt tokens are run in one left-padded block (padding sits between the
   shared prefix and the row's tokens; the attention mask hides it and position ids skip it);
3. greedy steps: a row that emits an end-of-sequence token or reaches its own output cap leaves
   the batch (its cache rows are dropped), so later steps only compute the rows still running.

The output is what greedy ``model.generate`` gives for each prompt on its own: the same tokens,
up to and including the first end-of-sequence token, at most the row's cap; ``no_repeat_ngram``
bans exactly the tokens that would repeat an n-gram of that row's own prompt + output. Only the
floating-point summation order differs from a one-row ``generate`` (as it does for any batch).

The same loop samples (:func:`ragged_decode` with ``temperature > 0``): each row draws its tokens
from its own seeded ``torch.Generator`` on the model's device (softmax of logits / temperature,
nucleus ``top_p``, drawn by the Gumbel-max trick: no per-step copy of the logits to the host), so a
row's output depends on its prompt and its seed only, never on which other rows share its batch.
That makes sampled candidate k of a text the same in every epoch, trial and batch (the generation
bank keys it on k). Beam search stays with ``model.generate``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["common_prefix_len", "ragged_decode", "ragged_greedy", "row_sampler", "supports_ragged_greedy"]

# Generation-config fields that would add logits processors or stopping criteria this path does
# not apply.
_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "guidance_scale": None,
    "stop_strings": None,
    "max_time": None,
}
# Zero is the same as unset for these.
_ZERO_IS_UNSET = frozenset({"min_length", "min_new_tokens"})


def supports_ragged_greedy(model: Any) -> bool:
    """True for a decoder-only model with full attention in every layer whose generation config
    adds no logits processor or stopping criterion of its own (then greedy ``generate`` is argmax
    plus what the caller asks for).

    Refused: sliding-window and chunked attention (their windows count cache slots, and the
    padding this path puts between the shared prefix and a row's own tokens would take slots of
    that row's window) and recurrent or convolution layers (their state would run through that
    padding); those models keep ``model.generate``.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if not _full_attention_only(cfg):
        return False
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return True
    for name, default in _PROCESSOR_DEFAULTS.items():
        value = getattr(gen, name, default)
        if value not in (default, None) and not (name in _ZERO_IS_UNSET and value == 0):
            return False
    return True


def _full_attention_only(cfg: Any) -> bool:
    """Every layer of the model's cache is a plain full-attention layer."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = list(DynamicCache(config=cfg).layers)
    except Exception:  # an older transformers, or a config the cache cannot read: ask the config
        layers = []
    if layers:
        return all(type(layer) is DynamicLayer for layer in layers)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return (
        getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False
    ) and getattr(cfg, "attention_chunk_size", None) is None


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row, leaving each row at least one
    token of its own (its last prompt token yields its first output)."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


class _NoRepeat:
    """Per-row table of the (n-1)-grams seen so far and the tokens that followed them; updated
    one token at a time (``generate``'s processor rescans the whole sequence every step)."""

    def __init__(self, n: int, prompt: Sequence[int]) -> None:
        self.n = n
        self.seq = list(prompt)
        self.seen: dict[tuple[int, ...], set[int]] = {}
        for i in range(len(self.seq) - n + 1):
            self.seen.setdefault(tuple(self.seq[i : i + n - 1]), set()).add(self.seq[i + n - 1])

    def banned(self) -> Iterable[int]:
        if len(self.seq) < self.n - 1:
            return ()
        return self.seen.get(tuple(self.seq[len(self.seq) - self.n + 1 :]), ())

    def push(self, tok: int) -> None:
        self.seq.append(tok)
        if len(self.seq) >= self.n:
            self.seen.setdefault(tuple(self.seq[-self.n : -1]), set()).add(tok)


def ragged_greedy(model: Any, prompts: Sequence[Sequence[int]], caps: Sequence[int], **kw: Any) -> list[list[int]]:
    """:func:`ragged_decode` with greedy decoding."""
    return ragged_decode(model, prompts, caps, **kw)


def row_sampler(temperature: float, top_p: float, seeds: Sequence[int], device: Any = "cpu"):
    """``choose(logits, rows) -> next tokens``: row r samples from softmax(logits / temperature),
    cut to the smallest set of tokens whose probability reaches ``top_p``, with its own generator.

    Everything stays on the logits' device (a GPU's): the nucleus cut is one batched sort, and the
    draw is the Gumbel-max trick, argmax(logits / T + G) with G = -log(-log U), which picks token v
    with probability softmax(logits / T)[v]. Each row's uniforms U come from its own generator
    (seeded by its seed, on the device), one per vocabulary entry per step, so a row's tokens
    depend on its prompt and seed only, never on the rows beside it."""
    import torch

    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    tiny = torch.finfo(torch.float32).tiny

    def choose(logits: Any, rows: Sequence[int]) -> Any:
        scores = logits.float() / temperature
        if top_p < 1.0:
            sorted_p, order = torch.softmax(scores, dim=-1).sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # tokens after the nucleus is full
            scores = scores.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=gens[r], device=scores.device, dtype=torch.float32) for r in rows])
        return (scores - torch.log(-torch.log(u.clamp_min(tiny)))).argmax(dim=-1)

    return choose


def ragged_decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    caps: Sequence[int],
    *,
    eos_ids: Iterable[int],
    pad_id: int,
    no_repeat_ngram_size: int = 0,
    min_shared_prefix: int = 4,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens of each prompt: up to and including the first token in ``eos_ids``, at most
    ``caps[i]`` tokens. ``prompts`` are unpadded token-id lists. ``temperature == 0``: greedy;
    ``> 0``: sampled, row i with a generator seeded by ``seeds[i]``."""
    import torch
    from transformers import DynamicCache

    if len(prompts) != len(caps):
        raise ValueError(f"{len(prompts)} prompts but {len(caps)} caps")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    eos = frozenset(int(e) for e in eos_ids)
    out: list[list[int]] = [[] for _ in prompts]
    rows = [i for i, c in enumerate(caps) if c > 0]
    if not rows:
        return out
    device = getattr(model, "device", torch.device("cpu"))
    b = len(rows)
    p = common_prefix_len([prompts[i] for i in rows])
    if b == 1 or p < min_shared_prefix:
        p = 0
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 builds its layers lazily
        cache = DynamicCache()
    # transformers 5.x names the forward argument ``cache``; 4.x ``past_key_values``. A peft
    # wrapper's forward hides the name, so ask the model it wraps.
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def forward(**kw: Any) -> Any:
        return model(**kw, **{cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    with torch.inference_mode():
        if p:
            forward(input_ids=torch.tensor([list(prompts[rows[0]][:p])], device=device))
            cache.batch_repeat_interleave(b)
        width = max(len(prompts[i]) - p for i in rows)
        ids = torch.full((b, width), int(pad_id), dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        for j, i in enumerate(rows):
            tail = list(prompts[i][p:])
            ids[j, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            mask[j, p + width - len(tail) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        logits = forward(input_ids=ids, attention_mask=mask, position_ids=pos[:, p:])
        last_pos = pos[:, -1]
        bans = [_NoRepeat(no_repeat_ngram_size, prompts[i]) for i in rows] if no_repeat_ngram_size > 0 else None
        choose = (
            row_sampler(temperature, top_p, [seeds[i] for i in rows], device) if temperature > 0 and seeds else None
        )
        active = list(range(b))  # positions in `rows` of the rows still decoding, in batch order
        while True:
            if bans is not None:
                for j, a in enumerate(active):
                    banned = list(bans[a].banned())
                    if banned:
                        logits[j, banned] = float("-inf")
            next_tok = logits.argmax(dim=-1) if choose is None else choose(logits, active)
            keep: list[int] = []
            for j, (a, tok) in enumerate(zip(active, next_tok.tolist())):
                i = rows[a]
                out[i].append(tok)
                if bans is not None:
                    bans[a].push(tok)
                if tok not in eos and len(out[i]) < caps[i]:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(sel)
                mask, last_pos, next_tok = mask[sel], last_pos[sel], next_tok[sel]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            last_pos = last_pos + 1
            logits = forward(input_ids=next_tok[:, None], attention_mask=mask, position_ids=last_pos[:, None])
    return out
