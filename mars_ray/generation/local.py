"""Local text generators (transformers, in-process) behind the :class:`TextGenerator` protocol.

- :class:`LocalChatGenerator`: a chat causal LM (``builtin:smollm2``, a local folder, a hub id).
  Requests go through the tokenizer's chat template with the generation prompt appended.
- :class:`Seq2SeqGenerator`: an encoder-decoder paraphraser (T5-style, e.g.
  ``humarin/chatgpt_paraphraser_on_T5_base``); the input is :func:`as_text` of the request, so a
  prefix such as ``"paraphrase: "`` is the caller's job.
- :func:`make_generator`: one factory for ``local``, ``seq2seq`` and ``openai`` back ends.

Decoding (both local classes), driven by :class:`GenParams`:

- ``temperature == 0``: deterministic. ``num_beams = max(params.num_beams, n)`` and
  ``num_return_sequences = n``: greedy when that is 1, beam search otherwise.
- ``temperature > 0``: multinomial sampling with ``temperature`` and ``top_p`` (no top-k cut-off,
  like OpenAI-compatible endpoints), ``n`` independent samples per request. Output slot k of a
  request is drawn with its own generator seeded from ``params.seed``, the sampling settings, the
  request's token ids and k: it is the same whatever ``n``, whatever other requests share the
  batch and whatever the caller did to the global RNG (which is left untouched), so a cache can
  key it on (request, k) and ``generate(..., first_slot=k)`` continues a request's samples where
  a cached prefix ends. Decoder-only full-attention models sample through
  :func:`~mars_ray.generation.ragged_decode.ragged_decode` (batched, one generator per row); other
  models sample one row at a time with ``model.generate`` under a per-row seed (slower).
- ``no_repeat_ngram_size > 0`` applies in both modes; ``max_new_tokens`` always.

Batching: requests are encoded once, sorted by length (longest first, less padding; an out-of-memory
shows up on the first chunk), generated ``batch_size`` requests at a time and returned in the
caller's order. Greedy decoding of one output per request with a full-attention chat model (the
paraphrase default) runs through :func:`~mars_ray.generation.ragged_decode.ragged_greedy` instead of
``model.generate``: the prompt template's common prefix is computed once per chunk and rows leave
the batch when they end, with the same output tokens (64 PKU paraphrase requests with SmolLM2 on 2
cores, chunks of 32: 28.8 s against 44.3 s, all 64 outputs identical). Per-request output caps
(``generate(..., max_new_tokens=[...])``) share a chunk: it runs to its largest cap (``generate``
stops early once every row has ended) and each row is cut at its own cap, which for greedy decoding
and sampling is exactly what that cap alone would give. Beam search depends on the horizon, so there
a chunk holds one cap only. On a CPU a decoding step is bound by reading the weights, so it costs
about the same for 4 or 16 rows (SmolLM2-135M, 2 cores: 236 ms for 4 rows, 262 ms for 16, 346 ms for
32): big chunks are cheap. A chunk that raises yields ``None`` for its outputs (a warning names the
exception type) and the call carries on; a request that cannot even be encoded yields ``None`` for
its outputs alone. Empty outputs are returned as ``""``: ``None`` means failure.

Behind :class:`~mars_ray.generation.cache.CachedGenerator`, a top-up from ``k`` cached outputs
to ``n`` regenerates with the full ``n`` and keeps slots ``k..n-1``: with beam search those are the
next-best beams (distinct from the cached ones); with sampling they are fresh draws.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from mars_ray.generation.base import GenParams, Request, TextGenerator, as_messages, as_text, request_caps
from mars_ray.generation.ragged_decode import ragged_decode, supports_ragged_greedy

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "LocalChatGenerator", "Seq2SeqGenerator", "make_generator"]

BACKENDS = ("local", "seq2seq", "openai")
_OPENAI_ONLY_KWARGS = frozenset({"concurrency", "timeout_s", "max_retries", "max_requests", "max_tokens"})
_LOCAL_KWARGS = frozenset({"device", "dtype", "system"})


class _LocalGenerator:
    """Shared machinery: encode, sort, chunk, generate, decode, count (subclasses encode/decode)."""

    model_id: str
    params: GenParams
    is_encoder_decoder: bool = False

    def __init__(self, model_id: str, params: GenParams, model: Any, tokenizer: Any, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if params.max_new_tokens < 1:
            raise ValueError(f"params.max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.temperature < 0:
            raise ValueError(f"params.temperature must be >= 0, got {params.temperature}")
        self.model_id = model_id
        self.params = params
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos_ids = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            pad = next(iter(sorted(self._eos_ids)), None)
        if pad is None:
            raise ValueError(f"{model_id}: the tokenizer has neither a pad nor an EOS token")
        self._pad_id = int(pad)
        # Counters (cumulative over the generator's life).
        self.calls = 0  # generate() calls
        self.batches = 0  # model.generate() calls
        self.generated_tokens = 0  # new tokens up to and including the first EOS, summed over outputs
        self.seconds = 0.0  # wall time inside model.generate() + decoding
        self.failed = 0  # outputs returned as None
        self.oom_splits = 0  # chunks split in two after running out of memory

    # ---- to be provided by subclasses -----------------------------------------------------

    def encode(self, request: Request) -> list[int]:
        """Token ids of one request's model input (no padding)."""
        raise NotImplementedError

    # ---- the protocol -----------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[Request],
        n: int = 1,
        *,
        max_new_tokens: Sequence[int] | None = None,
        first_slot: int | Sequence[int] = 0,
    ) -> list[list[str | None]]:
        """``n`` outputs per request, in request order; ``None`` marks a failed output.
        ``max_new_tokens``: one output cap per request (at most ``params.max_new_tokens``).
        ``first_slot``: the outputs are slots ``first_slot .. first_slot + n - 1`` (sampling: each
        slot has its own seed; deterministic decoding: the tail of a ``first_slot + n`` search);
        sampling also takes one first slot per request (a server whose requests carry their own
        seeds batches them this way)."""
        firsts = [int(first_slot)] * len(requests) if isinstance(first_slot, int) else [int(f) for f in first_slot]
        if len(firsts) != len(requests):
            raise ValueError(f"first_slot has {len(firsts)} entries for {len(requests)} requests")
        if n < 0 or any(f < 0 for f in firsts):
            raise ValueError(f"n and first_slot must be >= 0, got {n} and {first_slot}")
        if not isinstance(first_slot, int) and self.params.temperature == 0:
            raise ValueError("per-request first slots need sampled decoding")
        if isinstance(first_slot, int) and first_slot and self.params.temperature == 0:
            full = self.generate(requests, first_slot + n, max_new_tokens=max_new_tokens)
            return [row[first_slot:] for row in full]
        caps = request_caps(self.params, len(requests), max_new_tokens)
        self.calls += 1
        results: list[list[str | None]] = [[None] * n for _ in requests]
        if n == 0 or not requests:
            return results
        encoded: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                ids = self.encode(req)
                if not ids:
                    raise ValueError("empty model input")
                encoded[i] = ids
            except Exception as exc:  # a malformed request fails alone
                logger.warning(
                    "%s: request %d cannot be encoded (%s: %s); its %d outputs are None",
                    self.model_id,
                    i,
                    type(exc).__name__,
                    exc,
                    n,
                )
                self.failed += n

        def run(idxs: list[int]) -> list[list[str | None]]:
            """One chunk; out of memory: the two halves one after the other (rows do not depend
            on their batch: sampled rows have their own generators), down to single rows."""
            try:
                if self.params.temperature > 0:
                    return self._sample_chunk(
                        [encoded[i] for i in idxs], n, [caps[i] for i in idxs], [firsts[i] for i in idxs]
                    )
                return self._generate_chunk([encoded[i] for i in idxs], n, [caps[i] for i in idxs])
            except Exception as exc:
                if len(idxs) < 2 or not _out_of_memory(exc):
                    raise
                _free_accelerator_memory()
                self.oom_splits += 1
                half = len(idxs) // 2
                logger.warning("%s: out of memory on %d requests; splitting the chunk", self.model_id, len(idxs))
                return run(idxs[:half]) + run(idxs[half:])

        for idxs in self._chunks(encoded, caps, n):
            try:
                outs = run(idxs)
            except Exception as exc:  # one bad chunk (a single request out of memory, ...) must not sink the call
                logger.warning(
                    "%s: generation failed for a chunk of %d requests (%s: %s); its %d outputs are None",
                    self.model_id,
                    len(idxs),
                    type(exc).__name__,
                    exc,
                    len(idxs) * n,
                )
                self.failed += len(idxs) * n
                _free_accelerator_memory()
                continue
            for i, row in zip(idxs, outs):
                results[i] = row
        return results

    def _chunks(self, encoded: dict[int, list[int]], caps: list[int], n: int) -> list[list[int]]:
        """Request indices in chunks of ``batch_size``, longest input first (stable: ties keep
        request order); one cap per chunk under beam search."""
        beams = self.params.temperature == 0 and max(self.params.num_beams, n) > 1
        order = sorted(encoded, key=lambda i: (-caps[i] if beams else 0, -len(encoded[i])))
        out: list[list[int]] = []
        for i in order:
            if out and len(out[-1]) < self.batch_size and (not beams or caps[out[-1][0]] == caps[i]):
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def stats(self) -> dict[str, float]:
        """The counters, plus new tokens per second of generation time."""
        return {
            "calls": self.calls,
            "batches": self.batches,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 3),
            "failed": self.failed,
            "oom_splits": self.oom_splits,
            "tokens_per_s": round(self.generated_tokens / self.seconds, 2) if self.seconds > 0 else 0.0,
        }

    # ---- internals --------------------------------------------------------------------------

    def _decoding_kwargs(self, n: int, max_new_tokens: int) -> dict[str, Any]:
        p = self.params
        kw: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_return_sequences": n,
            "pad_token_id": self._pad_id,
        }
        if p.no_repeat_ngram_size > 0:
            kw["no_repeat_ngram_size"] = p.no_repeat_ngram_size
        if p.temperature == 0:
            kw.update(do_sample=False, num_beams=max(p.num_beams, n))
        else:
            kw.update(do_sample=True, num_beams=1, temperature=p.temperature, top_p=p.top_p, top_k=0)
        return kw

    def _slot_seed(self, ids: list[int], slot: int) -> int:
        """The seed of output ``slot`` of the request with token ids ``ids``."""
        p = self.params
        h = hashlib.sha256(f"{p.seed}|{p.temperature}|{p.top_p}|{slot}|".encode())
        h.update(",".join(map(str, ids)).encode())
        return int.from_bytes(h.digest()[:8], "big") & ((1 << 63) - 1)

    def _sample_chunk(self, chunk: list[list[int]], n: int, caps: list[int], firsts: list[int]) -> list[list[str]]:
        """Slots ``firsts[r] ..`` of each request r, every row with its own seed (:meth:`_slot_seed`)."""

        t0 = time.perf_counter()
        prompts = [ids for ids in chunk for _ in range(n)]
        row_caps = [c for c in caps for _ in range(n)]
        seeds = [self._slot_seed(ids, f + k) for ids, f in zip(chunk, firsts) for k in range(n)]
        p = self.params
        if self._ragged_capable():
            self.batches += 1
            rows = ragged_decode(
                self.model,
                prompts,
                row_caps,
                eos_ids=self._eos_ids,
                pad_id=self._pad_id,
                no_repeat_ngram_size=p.no_repeat_ngram_size,
                temperature=p.temperature,
                top_p=p.top_p,
                seeds=seeds,
            )
        else:
            rows = self._sample_batched(prompts, row_caps, seeds)
        texts = [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        self.generated_tokens += sum(len(r) for r in rows)
        self.seconds += time.perf_counter() - t0
        return [texts[r * n : (r + 1) * n] for r in range(len(chunk))]

    def _sample_batched(self, prompts: list[list[int]], caps: list[int], seeds: list[int]) -> list[list[int]]:
        """Sampled rows through ``model.generate`` in one batch (seq2seq models, and decoders the
        ragged loop cannot run), each row from its own generator: ``generate`` runs greedy, and a
        last logits processor turns each row's scores into its draw (temperature, nucleus, and the
        Gumbel-max trick of :func:`~mars_ray.generation.ragged_decode.row_sampler`), after the
        no-repeat ban. Every row draws once per step from step 0, so its tokens do not depend on the
        rows beside it (``generate``'s own sampling draws a batch from one generator)."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from mars_ray.generation.ragged_decode import row_sampler

        p = self.params
        device = getattr(self.model, "device", torch.device("cpu"))
        choose = row_sampler(p.temperature, p.top_p, seeds, device)
        everyone = list(range(len(prompts)))

        class _Draw(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                tok = choose(scores, everyone)
                return torch.full_like(scores, float("-inf")).scatter_(1, tok[:, None], 0.0)

        kw = self._decoding_kwargs(1, max(caps))
        for k in ("temperature", "top_p", "top_k"):
            kw.pop(k, None)
        kw.update(do_sample=False, num_beams=1, logits_processor=LogitsProcessorList([_Draw()]))
        input_ids, mask = self._pad(prompts, left=not self.is_encoder_decoder)
        input_ids, mask = input_ids.to(device), mask.to(device)
        self.batches += 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
        if not torch.is_tensor(out):
            out = out.sequences
        new = out[:, 1:] if self.is_encoder_decoder else out[:, input_ids.shape[1] :]
        return self._cut(new.tolist(), caps)

    def _pad(self, chunk: list[list[int]], left: bool) -> tuple[Any, Any]:
        import torch

        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            sl = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, sl] = torch.tensor(ids, dtype=torch.long)
            mask[row, sl] = 1
        return input_ids, mask

    def _cut(self, rows: list[list[int]], caps: list[int]) -> list[list[int]]:
        """Each row of new tokens up to and including its first EOS, at most its cap long."""
        out = []
        for row, cap in zip(rows, caps):
            row = row[:cap]
            for j, tok in enumerate(row):
                if tok in self._eos_ids:
                    row = row[: j + 1]
                    break
            out.append(row)
        return out

    def _ragged_capable(self) -> bool:
        """A decoder-only, full-attention model with the ragged path switched on."""
        return getattr(self, "ragged", False) and not self.is_encoder_decoder and supports_ragged_greedy(self.model)

    def _ragged(self, n: int) -> bool:
        """Greedy, one output per request: :func:`ragged_greedy` gives the same tokens as
        ``model.generate`` with a shared prompt prefix computed once and ended rows leaving the batch."""
        p = self.params
        return p.temperature == 0 and max(p.num_beams, n) == 1 and self._ragged_capable()

    def _generate_chunk(self, chunk: list[list[int]], n: int, caps: list[int]) -> list[list[str]]:
        import torch

        t0 = time.perf_counter()
        if self._ragged(n):
            self.batches += 1
            rows = ragged_decode(
                self.model,
                chunk,
                caps,
                eos_ids=self._eos_ids,
                pad_id=self._pad_id,
                no_repeat_ngram_size=self.params.no_repeat_ngram_size,
            )
            texts = [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
            self.generated_tokens += sum(len(r) for r in rows)
            self.seconds += time.perf_counter() - t0
            return [[t] for t in texts]
        input_ids, mask = self._pad(chunk, left=not self.is_encoder_decoder)
        device = getattr(self.model, "device", None)
        if device is not None:
            input_ids, mask = input_ids.to(device), mask.to(device)
        kw = self._decoding_kwargs(n, max(caps))
        self.batches += 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
        if not torch.is_tensor(out):  # a GenerateOutput when the model's config asks for one
            out = out.sequences
        # Decoder-only: the output repeats the (padded) prompt. Encoder-decoder: it starts with the
        # decoder start token.
        new = out[:, 1:] if self.is_encoder_decoder else out[:, input_ids.shape[1] :]
        if new.shape[0] != len(chunk) * n:
            raise RuntimeError(f"model.generate returned {new.shape[0]} sequences for {len(chunk)} x {n}")
        rows = self._cut(new.tolist(), [c for c in caps for _ in range(n)])
        texts = [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        self.generated_tokens += sum(len(r) for r in rows)
        self.seconds += time.perf_counter() - t0
        return [texts[r * n : (r + 1) * n] for r in range(len(chunk))]


def _out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover - torch without the CUDA module
        pass
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "can't allocate" in text)


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort only
        pass


def _check_ref(model_ref: str | None, model: Any, tokenizer: Any, cls: str) -> None:
    if model is None and tokenizer is None:
        if not model_ref:
            raise ValueError(f"{cls} needs model_ref (e.g. 'builtin:smollm2') or a preloaded model and tokenizer")
    elif model is None or tokenizer is None:
        raise ValueError(f"{cls}: pass both model= and tokenizer= (or neither, to load model_ref)")
    elif not model_ref:
        raise ValueError(f"{cls}: a preloaded model still needs model_ref, its id for lineage and cache keys")


class LocalChatGenerator(_LocalGenerator):
    """A chat causal LM run in-process with transformers (implements :class:`TextGenerator`).

    Args:
        model_ref: Model reference (``builtin:smollm2``, a local directory, a hub id), loaded with
            :func:`~mars_ray.models.resolve.load_causal_lm`. With a preloaded ``model``/``tokenizer``
            it is only the id used for lineage and cache keys (and is then required).
        params: Decoding parameters (see the module docstring).
        model, tokenizer: A preloaded causal LM and its tokenizer (the tokenizer needs a chat
            template). Inputs are sent to ``model.device``; ``device``/``dtype`` are not applied.
        batch_size: Requests per ``model.generate`` call (each expands to ``n`` or ``num_beams`` rows).
        device: Where a model loaded here is put.
        dtype: Weights dtype for a model loaded here (``None``: the checkpoint's).
        system: System prompt added to requests that have none.
        ragged: Greedy single outputs through :func:`~mars_ray.generation.ragged_decode.ragged_greedy`
            (same tokens as ``model.generate``, less work); ``False``: always ``model.generate``.
        cache_dir, offline: Passed to :func:`~mars_ray.models.resolve.resolve_model`.

    Attributes:
        model_id: ``model_ref`` as given (stripped).
        calls, batches, generated_tokens, seconds, failed: Counters; see :meth:`stats`.
    """

    is_encoder_decoder = False

    def __init__(
        self,
        model_ref: str | None = None,
        params: GenParams = GenParams(),
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: Any = None,
        system: str | None = None,
        cache_dir: str | None = None,
        offline: bool | None = None,
        ragged: bool = True,
    ) -> None:
        _check_ref(model_ref, model, tokenizer, type(self).__name__)
        if model is None:
            from mars_ray.models.resolve import load_causal_lm, resolve_model

            t0 = time.perf_counter()
            resolved = resolve_model(str(model_ref), cache_dir=cache_dir, offline=offline)
            model, tokenizer = load_causal_lm(resolved, dtype=dtype)
            model.to(device)
            logger.info("%s loaded in %.1f s", model_ref, time.perf_counter() - t0)
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{model_ref} is an encoder-decoder model: use Seq2SeqGenerator (backend 'seq2seq')")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{model_ref}: the tokenizer has no chat template; use an instruct/chat model, or the "
                "'seq2seq' backend for plain-text paraphrasers"
            )
        model.eval()
        self.system = system
        self.ragged = bool(ragged)
        super().__init__(str(model_ref).strip(), params, model, tokenizer, batch_size)

    def render(self, request: Request) -> str:
        """The prompt text a request becomes (chat template + generation prompt)."""
        return self.tokenizer.apply_chat_template(
            as_messages(request, self.system), add_generation_prompt=True, tokenize=False
        )

    def encode(self, request: Request) -> list[int]:
        # The template already holds any BOS/role markers: do not add special tokens again.
        return list(self.tokenizer(self.render(request), add_special_tokens=False)["input_ids"])


class Seq2SeqGenerator(_LocalGenerator):
    """An encoder-decoder paraphraser (T5-style) run in-process (implements :class:`TextGenerator`).

    The model input is :func:`as_text` of each request (chat messages: the last user turn), with
    the tokenizer's special tokens (T5 appends ``</s>``). Encoder inputs are right-padded.

    Args: as :class:`LocalChatGenerator`, without ``system``; loads ``AutoModelForSeq2SeqLM``.
    """

    is_encoder_decoder = True

    def __init__(
        self,
        model_ref: str | None = None,
        params: GenParams = GenParams(),
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: Any = None,
        cache_dir: str | None = None,
        offline: bool | None = None,
    ) -> None:
        _check_ref(model_ref, model, tokenizer, type(self).__name__)
        if model is None:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            from mars_ray.models.resolve import resolve_model

            t0 = time.perf_counter()
            resolved = resolve_model(str(model_ref), cache_dir=cache_dir, offline=offline)
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
            kw = {} if dtype is None else {"dtype": dtype}
            model = AutoModelForSeq2SeqLM.from_pretrained(resolved.path, **kw)
            model.to(device)
            logger.info("%s loaded in %.1f s", model_ref, time.perf_counter() - t0)
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{model_ref} is not an encoder-decoder model: use LocalChatGenerator (backend 'local')")
        model.eval()
        super().__init__(str(model_ref).strip(), params, model, tokenizer, batch_size)

    def encode(self, request: Request) -> list[int]:
        return list(self.tokenizer(as_text(request))["input_ids"])


def make_generator(
    backend: str,
    model: str,
    params: GenParams,
    *,
    batch_size: int,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    cache_dir: str | None = None,
    offline: bool | None = None,
    **openai_kwargs: Any,
) -> TextGenerator:
    """Build a generator for a back end: ``local``, ``seq2seq`` or ``openai``.

    Args:
        backend: ``"local"`` (:class:`LocalChatGenerator`), ``"seq2seq"`` (:class:`Seq2SeqGenerator`)
            or ``"openai"`` (``mars_ray.generation.openai_backend.OpenAIGenerator``, imported lazily).
        model: Model reference (local back ends) or endpoint model name (``openai``).
        params: Decoding parameters.
        batch_size: Requests per forward batch (local back ends; not used by ``openai``).
        base_url, api_key_env: The OpenAI-compatible endpoint and the variable holding its key.
        cache_dir, offline: Model resolution for the local back ends.
        **openai_kwargs: Passed to ``OpenAIGenerator`` (``concurrency``, ``timeout_s``,
            ``max_retries``, ``max_requests``, ``max_tokens``). The local back ends accept
            ``device``, ``dtype`` and (``local`` only) ``system`` here and ignore the OpenAI-only keys.

    Raises:
        ValueError: Unknown back end (the message lists the choices).
        TypeError: A keyword the chosen back end does not know.
    """
    name = (backend or "").strip().lower()
    if name == "openai":
        from mars_ray.generation.openai_backend import OpenAIGenerator

        return OpenAIGenerator(model, params, base_url=base_url, api_key_env=api_key_env, **openai_kwargs)
    if name in ("local", "seq2seq"):
        allowed = _LOCAL_KWARGS - ({"system"} if name == "seq2seq" else set())
        unknown = set(openai_kwargs) - allowed - _OPENAI_ONLY_KWARGS
        if unknown:
            raise TypeError(f"make_generator(backend={name!r}) got unexpected keyword(s) {sorted(unknown)}")
        ignored = sorted(set(openai_kwargs) & _OPENAI_ONLY_KWARGS)
        if ignored:
            logger.debug("make_generator(backend=%r): ignoring endpoint-only options %s", name, ignored)
        local_kw = {k: v for k, v in openai_kwargs.items() if k in allowed}
        cls = LocalChatGenerator if name == "local" else Seq2SeqGenerator
        return cls(model, params, batch_size=batch_size, cache_dir=cache_dir, offline=offline, **local_kw)
    raise ValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
