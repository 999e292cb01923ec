"""Tests for mars_ray.generation.local.

Unmarked tests use tiny random models (a 2-layer Llama with the SmolLM2 tokenizer and chat template,
and a 2-layer T5 with the MiniLM tokenizer): their outputs are gibberish, the mechanics are real.
Tests marked ``slow`` load the real builtin:smollm2.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mars_ray.generation import (  # noqa: E402
    CachedGenerator,
    GenerationCache,
    GenParams,
    LazyGenerator,
    TextGenerator,
)
from mars_ray.generation.local import (  # noqa: E402
    LocalChatGenerator,
    Seq2SeqGenerator,
    make_generator,
)

SHORT = "Hi"
LONG = "Please summarise this long and rambling text about rivers and mountains. " * 12
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
REQUESTS = [SHORT, LONG, CHAT, "A medium sized request with a few more words in it.", "x"]


def tiny_t5(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide T5 with the MiniLM (BERT) tokenizer: a tiny encoder-decoder."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from mars_ray.models import minilm_path

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def llama_parts(tiny_llama_dir):
    """One loaded tiny Llama shared by the tests (generators wrap it with different params)."""
    from mars_ray.models import load_causal_lm

    return load_causal_lm(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def t5_parts(t5_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval(), AutoTokenizer.from_pretrained(t5_dir)


def chat_gen(llama_parts, ref="tiny-llama", batch_size=2, **params):
    model, tok = llama_parts
    return LocalChatGenerator(
        ref, GenParams(**{"max_new_tokens": 6, **params}), model=model, tokenizer=tok, batch_size=batch_size
    )


def s2s_gen(t5_parts, batch_size=2, **params):
    model, tok = t5_parts
    return Seq2SeqGenerator(
        "tiny-t5", GenParams(**{"max_new_tokens": 6, **params}), model=model, tokenizer=tok, batch_size=batch_size
    )


def both(llama_parts, t5_parts, **kw):
    return [chat_gen(llama_parts, **kw), s2s_gen(t5_parts, **kw)]


# ------------------------------------------------------------------ loading and construction


def test_loads_from_ref_and_implements_protocol(tiny_llama_dir, t5_dir):
    g = LocalChatGenerator(str(tiny_llama_dir), GenParams(max_new_tokens=4), batch_size=3)
    assert isinstance(g, TextGenerator)
    assert g.model_id == str(tiny_llama_dir) and g.batch_size == 3
    assert g.tokenizer.padding_side == "left" and not g.model.training
    s = Seq2SeqGenerator(str(t5_dir), GenParams(max_new_tokens=4))
    assert isinstance(s, TextGenerator) and s.model_id == str(t5_dir)
    assert all(isinstance(o, str) for row in s.generate(["paraphrase: a cat"], 2) for o in row)


def test_constructor_errors(llama_parts, t5_parts):
    model, tok = llama_parts
    with pytest.raises(ValueError, match="model_ref"):
        LocalChatGenerator(model=model, tokenizer=tok)  # no id for lineage
    with pytest.raises(ValueError, match="both"):
        LocalChatGenerator("x", model=model)
    with pytest.raises(ValueError, match="model_ref"):
        LocalChatGenerator()
    with pytest.raises(ValueError, match="Seq2SeqGenerator"):
        LocalChatGenerator("t5", model=t5_parts[0], tokenizer=t5_parts[1])
    with pytest.raises(ValueError, match="LocalChatGenerator"):
        Seq2SeqGenerator("llama", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="batch_size"):
        LocalChatGenerator("x", model=model, tokenizer=tok, batch_size=0)


# ------------------------------------------------------------------ shapes, order, padding


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_n_outputs_per_request(llama_parts, t5_parts, temperature):
    for g in both(llama_parts, t5_parts, temperature=temperature):
        out = g.generate(REQUESTS, 3)
        assert len(out) == len(REQUESTS)
        assert all(len(row) == 3 and all(isinstance(t, str) for t in row) for row in out)
        assert all(t == t.strip() for row in out for t in row)
        assert g.generate(REQUESTS, 0) == [[] for _ in REQUESTS]
        assert g.generate([], 2) == []
        with pytest.raises(ValueError):
            g.generate(REQUESTS, -1)


def test_batched_equals_one_at_a_time_and_order_kept(llama_parts, t5_parts):
    """Greedy n=1: padding (left for the decoder-only model) must not change any output, and
    the length-sorted chunks must come back in request order."""
    for g in both(llama_parts, t5_parts, batch_size=2):
        batched = g.generate(REQUESTS, 1)
        singles = [g.generate([r], 1)[0] for r in REQUESTS]
        assert batched == singles, type(g).__name__
        # the short prompt alone vs in one batch with the long one
        assert g.generate([SHORT, LONG], 1) == [singles[0], singles[1]]
        assert g.generate([LONG, SHORT], 1) == [singles[1], singles[0]]
    # order really is restored: the outputs differ between requests, so a shuffle would show
    assert len({tuple(r) for r in batched}) > 1


def test_per_request_caps_share_a_chunk_and_equal_separate_calls(llama_parts, t5_parts):
    """Greedy and sampled: requests with different output caps share one batch (each sampled row
    with its own seed), and each output is what a call with that
    cap alone gives, for sampling too (every output slot has its own seed)."""
    caps = [2, 9, 5, 9, 1]
    for params in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 3}):
        for g in both(llama_parts, t5_parts, batch_size=8, max_new_tokens=9, **params):
            before, tokens = g.batches, g.generated_tokens
            mixed = g.generate(REQUESTS, 1, max_new_tokens=caps)
            assert g.batches == before + 1, type(g).__name__  # one batch, sampled seq2seq too
            assert 0 < g.generated_tokens - tokens <= sum(caps)
            for r, c, out in zip(REQUESTS, caps, mixed):
                assert out == g.generate([r], 1, max_new_tokens=[c])[0], (type(g).__name__, c)
    g = chat_gen(llama_parts, batch_size=8, max_new_tokens=9)
    assert g.generate([SHORT], 1, max_new_tokens=[50]) == g.generate([SHORT], 1)  # never above params
    with pytest.raises(ValueError, match="2 entries for 1 requests"):
        g.generate([SHORT], 1, max_new_tokens=[3, 4])


def test_beam_search_keeps_one_cap_per_chunk(llama_parts):
    """Beam search depends on its horizon: requests with different caps go to different chunks."""
    g = chat_gen(llama_parts, batch_size=8, max_new_tokens=9)
    before = g.batches
    mixed = g.generate(REQUESTS[:4], 2, max_new_tokens=[3, 7, 3, 7])
    assert g.batches == before + 2
    assert mixed[1] == g.generate([REQUESTS[1]], 2, max_new_tokens=[7])[0]


def test_cache_keys_follow_each_requests_own_cap(llama_parts, tmp_path):
    """A request's cached output does not depend on the requests that shared its batch."""
    inner = chat_gen(llama_parts, batch_size=8, max_new_tokens=9)
    cached = CachedGenerator(inner, GenerationCache(tmp_path / "gen.sqlite"))
    first = cached.generate(REQUESTS[:3], 1, max_new_tokens=[4, 9, 6])
    calls = inner.calls
    # the same texts, alone or with other company, with their own caps: all cache hits
    assert cached.generate([REQUESTS[2]], 1, max_new_tokens=[6]) == [first[2]]
    assert cached.generate([REQUESTS[1], "new"], 1, max_new_tokens=[9, 4])[0] == first[1]
    assert inner.calls == calls + 1 and cached.stats.generated == 4  # only "new" was generated
    # another cap is another key
    cached.generate([REQUESTS[0]], 1, max_new_tokens=[5])
    assert inner.calls == calls + 2


def test_a_text_asked_for_twice_in_one_call_counts_two_hits(llama_parts, tmp_path):
    """Counters add up per slot asked for: requested = hits + generated + failed, also when one call
    carries the same request twice (the bank report's misses are requested - hits)."""
    inner = chat_gen(llama_parts, batch_size=8, max_new_tokens=6)
    cached = CachedGenerator(inner, GenerationCache(tmp_path / "gen.sqlite"))
    first = cached.generate([REQUESTS[0], REQUESTS[1]], 2)
    cached.stats = type(cached.stats)()
    calls = inner.calls
    again = cached.generate([REQUESTS[0], REQUESTS[1], REQUESTS[0]], 2)
    assert again == [first[0], first[1], first[0]] and inner.calls == calls
    s = cached.stats
    assert (s.requested, s.hits, s.generated, s.failed) == (6, 6, 0, 0)


def test_left_padding_and_chat_template_reach_the_model(llama_parts, monkeypatch):
    # beam search goes through model.generate (greedy and sampling take ragged_decode, tested on its own)
    g = chat_gen(llama_parts, batch_size=4, num_beams=2)
    g.system = "You are terse."
    seen = {}
    real = g.model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(g.model, "generate", spy)
    g.generate([SHORT, LONG], 1)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    # chunks are sorted longest first: row 0 is LONG (no padding), row 1 is SHORT, padded on the left
    assert ids.shape[0] == 2 and mask[0].all() and mask[1, 0] == 0 and mask[1, -1] == 1
    decoded = [g.tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)]
    for text, src in zip(decoded, (LONG, SHORT)):
        assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
        assert f"<|im_start|>user\n{src}<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert (ids[1, ~mask[1].bool()] == g.tokenizer.pad_token_id).all()
    # the rendered prompt is what gets encoded, with no extra special tokens
    assert g.tokenizer.decode(g.encode(CHAT)) == g.render(CHAT)
    assert g.render(CHAT).count("<|im_start|>system") == 1  # an explicit system turn is kept, not doubled
    assert "Be brief." in g.render(CHAT) and "You are terse." not in g.render(CHAT)


def test_seq2seq_input_is_plain_text(t5_parts, monkeypatch):
    g = s2s_gen(t5_parts)
    seen = {}
    real = g.model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(g.model, "generate", spy)
    g.generate(["paraphrase: a b c d e f", [{"role": "user", "content": "paraphrase: hello"}]], 1)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    assert mask[1, 0] == 1 and mask[1, -1] == 0  # encoder inputs are right-padded
    texts = g.tokenizer.batch_decode([r[m.bool()] for r, m in zip(ids, mask)], skip_special_tokens=True)
    assert texts == ["paraphrase : a b c d e f", "paraphrase : hello"]  # BERT tokenizer spacing


# ------------------------------------------------------------------ determinism


def test_beam_search_is_deterministic_and_uses_n_beams(llama_parts, t5_parts, monkeypatch):
    for g in both(llama_parts, t5_parts, no_repeat_ngram_size=2):
        first = g.generate(REQUESTS, 3)
        assert g.generate(REQUESTS, 3) == first
        seen = {}
        real = g.model.generate
        monkeypatch.setattr(g.model, "generate", lambda **kw: seen.update(kw) or real(**kw))  # noqa: B023 (called in this iteration)
        g.generate([SHORT], 3)
        assert seen["num_beams"] == 3 and seen["num_return_sequences"] == 3 and seen["do_sample"] is False
        assert seen["no_repeat_ngram_size"] == 2
        monkeypatch.undo()
    g = chat_gen(llama_parts, num_beams=5)
    assert g._decoding_kwargs(2, 16)["num_beams"] == 5  # max(params.num_beams, n)
    assert g._decoding_kwargs(1, 16)["num_beams"] == 5
    assert chat_gen(llama_parts)._decoding_kwargs(1, 16)["num_beams"] == 1  # greedy
    assert "no_repeat_ngram_size" not in chat_gen(llama_parts)._decoding_kwargs(1, 16)


def test_sampling_is_seeded(llama_parts, t5_parts):
    for make in (lambda **kw: chat_gen(llama_parts, **kw), lambda **kw: s2s_gen(t5_parts, **kw)):
        g0, g0b, g1 = make(temperature=1.0, seed=0), make(temperature=1.0, seed=0), make(temperature=1.0, seed=1)
        rng_before = torch.get_rng_state()
        a = g0.generate(REQUESTS, 2)
        assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
        torch.manual_seed(1234)  # global state must not matter either
        assert g0.generate(REQUESTS, 2) == a
        assert g0b.generate(REQUESTS, 2) == a
        assert g1.generate(REQUESTS, 2) != a
        assert any(row[0] != row[1] for row in a)  # n samples, not n copies
        kw = g0._decoding_kwargs(2, 16)
        assert kw["do_sample"] is True and kw["temperature"] == 1.0 and kw["top_p"] == 1.0 and kw["num_beams"] == 1


# ------------------------------------------------------------------ failures


def test_failing_chunk_yields_none_and_does_not_raise(llama_parts, t5_parts, monkeypatch, caplog):
    for g in both(llama_parts, t5_parts, batch_size=2):
        real = g.model.generate
        calls = []

        def flaky(_calls=calls, _real=real, **kw):
            _calls.append(kw["input_ids"].shape[0])
            if len(_calls) == 2:
                raise RuntimeError("simulated device failure")
            return _real(**kw)

        monkeypatch.setattr(g.model, "generate", flaky)
        with caplog.at_level(logging.WARNING, logger="mars_ray.generation.local"):
            out = g.generate(REQUESTS, 2)
        monkeypatch.undo()
        assert len(calls) == 3  # 5 requests in chunks of 2: the call went on after the failure
        failed = [i for i, row in enumerate(out) if row == [None, None]]
        ok = [i for i, row in enumerate(out) if all(isinstance(t, str) for t in row)]
        assert len(failed) == 2 and len(ok) == 3
        assert g.failed == 4
        assert "RuntimeError" in caplog.text and "simulated device failure" in caplog.text
        # the successful outputs are the ones an unfailing run gives
        clean = g.generate(REQUESTS, 2)
        assert all(out[i] == clean[i] for i in ok)
        caplog.clear()


def test_out_of_memory_splits_the_chunk_instead_of_losing_it(llama_parts, t5_parts, monkeypatch):
    """Issue 39, defect 6: an out-of-memory chunk used to become None outputs; now it is halved and
    run again, down to single requests, and every output is the one an unsplit run gives."""
    import torch

    for g in both(llama_parts, t5_parts, batch_size=4):
        clean = g.generate(REQUESTS, 2)
        real, sizes = g.model.generate, []

        def small_only(_real=real, _sizes=sizes, **kw):
            _sizes.append(kw["input_ids"].shape[0])
            if kw["input_ids"].shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 GiB")
            return _real(**kw)

        monkeypatch.setattr(g.model, "generate", small_only)
        out = g.generate(REQUESTS, 2)
        monkeypatch.undo()
        assert out == clean and g.failed == 0 and g.oom_splits >= 2, (sizes, g.oom_splits)
        assert g.stats()["oom_splits"] == g.oom_splits


def test_unencodable_request_fails_alone(llama_parts):
    g = chat_gen(llama_parts)
    out = g.generate([SHORT, 12345, LONG], 2)  # type: ignore[list-item]
    assert out[1] == [None, None]
    assert all(isinstance(t, str) for t in out[0] + out[2])


# ------------------------------------------------------------------ cache and counters


def test_cached_generator_generates_only_missing_slots(llama_parts, tmp_path):
    """Sampled slots are continued from the first missing one; beam slots are keyed on the beams
    that produced them, so a 3-beam request never reuses a 2-beam search's outputs."""
    inner = chat_gen(llama_parts, batch_size=4, temperature=0.9, seed=5)
    cache = GenerationCache(tmp_path / "gen.sqlite")
    cached = CachedGenerator(inner, cache)
    reqs = REQUESTS[:3]
    first = cached.generate(reqs, 2)
    assert cached.stats.generated == 6 and inner.calls == 1 and len(cache) == 6
    again = cached.generate(reqs, 2)
    assert again == first and cached.stats.generated == 6 and inner.calls == 1  # zero new generations
    more = cached.generate(reqs, 3)
    # one call, for slot 2 only (first_slot=2); slots 0-1 come from the cache
    assert inner.calls == 2 and len(cache) == 9 and cached.stats.hits == 6 + 6 and cached.stats.generated == 9
    assert [row[:2] for row in more] == first
    assert all(isinstance(t, str) for row in more for t in row)
    # slot 2 is what a fresh 3-sample call gives: the slot's own seed, not the call's
    assert more == inner.generate(reqs, 3)
    assert [row[2] for row in more] == [row[0] for row in inner.generate(reqs, 1, first_slot=2)]
    # a fresh generator over the same cache file (a rerun) generates nothing
    inner2 = chat_gen(llama_parts, batch_size=4, temperature=0.9, seed=5)
    assert CachedGenerator(inner2, GenerationCache(tmp_path / "gen.sqlite")).generate(reqs, 3) == more
    assert inner2.calls == 0
    # beams: 2 then 3 outputs are two different searches, keyed apart
    beams = CachedGenerator(chat_gen(llama_parts, batch_size=4), GenerationCache(tmp_path / "beams.sqlite"))
    two = beams.generate(reqs, 2)
    three = beams.generate(reqs, 3)
    assert beams.stats.hits == 0 and beams.stats.generated == 6 + 9
    assert three == beams.inner.generate(reqs, 3) and two == beams.inner.generate(reqs, 2)
    assert beams.generate(reqs, 2) == two and beams.stats.hits == 6


def test_lazy_generator_builds_on_the_first_miss_and_shares_the_model(llama_parts, tmp_path):
    builds = []

    def build():
        builds.append(1)
        return chat_gen(llama_parts, batch_size=4)

    lazy = LazyGenerator("tiny-llama", GenParams(max_new_tokens=6), build)
    assert isinstance(lazy, TextGenerator) and not lazy.loaded
    cached = CachedGenerator(lazy, GenerationCache(tmp_path / "gen.sqlite"))
    reqs = REQUESTS[:3]
    first = cached.generate(reqs, 2)
    assert lazy.loaded and builds == [1]
    assert first == chat_gen(llama_parts, batch_size=4).generate(reqs, 2)  # same outputs as the eager generator
    # A fully cached call on a fresh lazy generator never builds its model.
    fresh = LazyGenerator("tiny-llama", GenParams(max_new_tokens=6), build)
    assert CachedGenerator(fresh, GenerationCache(tmp_path / "gen.sqlite")).generate(reqs, 2) == first
    assert not fresh.loaded and builds == [1]
    # Other decoding parameters: the same built model, each view with its own params.
    short = cached.with_params(max_new_tokens=2)
    out = short.generate(reqs, 1)
    assert builds == [1] and out == chat_gen(llama_parts, batch_size=4, max_new_tokens=2).generate(reqs, 1)
    assert lazy.backend().params.max_new_tokens == 6  # the shared back end keeps its own params
    # The id is part of every cache key, so a back end that names itself differently is refused.
    wrong = LazyGenerator("another-id", GenParams(max_new_tokens=6), build)
    with pytest.raises(ValueError, match="differs from the declared"):
        wrong.generate(reqs, 1)


def test_counters(llama_parts):
    g = chat_gen(llama_parts, batch_size=2, max_new_tokens=5)
    g.generate(REQUESTS, 2)
    s = g.stats()
    assert s["calls"] == 1 and s["batches"] == 3 and s["failed"] == 0
    assert 0 < s["generated_tokens"] <= len(REQUESTS) * 2 * 5
    assert s["seconds"] > 0 and s["tokens_per_s"] > 0


# ------------------------------------------------------------------ factory


def test_make_generator_local_backends(tiny_llama_dir, t5_dir):
    p = GenParams(max_new_tokens=3)
    g = make_generator("local", str(tiny_llama_dir), p, batch_size=5, system="S", concurrency=4, timeout_s=3)
    assert isinstance(g, LocalChatGenerator) and g.batch_size == 5 and g.system == "S" and g.params == p
    s = make_generator("seq2seq", str(t5_dir), p, batch_size=2)
    assert isinstance(s, Seq2SeqGenerator) and s.batch_size == 2
    with pytest.raises(TypeError, match="bogus"):
        make_generator("local", str(tiny_llama_dir), p, batch_size=2, bogus=1)
    with pytest.raises(ValueError, match="local, seq2seq, openai"):
        make_generator("vllm", "m", p, batch_size=2)


def test_make_generator_openai_passes_through(monkeypatch):
    """The OpenAI back end is imported lazily and gets every endpoint option unchanged."""
    seen = {}

    class FakeOpenAIGenerator:
        def __init__(self, model, params, **kw):
            seen.update(model=model, params=params, **kw)

    fake = types.ModuleType("mars_ray.generation.openai_backend")
    fake.OpenAIGenerator = FakeOpenAIGenerator
    monkeypatch.setitem(sys.modules, "mars_ray.generation.openai_backend", fake)
    p = GenParams(temperature=0.7)
    g = make_generator(
        "openai",
        "gpt-x",
        p,
        batch_size=8,
        base_url="http://h/v1",
        api_key_env="K",
        concurrency=3,
        timeout_s=9.0,
        max_retries=2,
        max_requests=10,
        max_tokens=100,
    )
    assert isinstance(g, FakeOpenAIGenerator)
    assert seen == dict(
        model="gpt-x",
        params=p,
        base_url="http://h/v1",
        api_key_env="K",
        concurrency=3,
        timeout_s=9.0,
        max_retries=2,
        max_requests=10,
        max_tokens=100,
    )


def test_make_generator_real_openai_backend():
    """With the real back end (when present): constructed without touching the network."""
    pytest.importorskip("mars_ray.generation.openai_backend")
    g = make_generator(
        "openai", "smol", GenParams(), batch_size=8, base_url="http://127.0.0.1:9/v1", concurrency=2, max_retries=0
    )
    assert isinstance(g, TextGenerator) and "smol" in g.model_id


# ------------------------------------------------------------------ slow: real SmolLM2

PARA_TEXTS = [
    "The meeting has been moved to Thursday afternoon because the manager is travelling.",
    "Drink plenty of water during hot weather to avoid dehydration.",
    "The library closes early on public holidays, so plan your visit accordingly.",
    "Our new phone has a larger battery and a brighter screen than the previous model.",
]
COMMON_EN = {
    "the",
    "a",
    "an",
    "to",
    "of",
    "and",
    "is",
    "on",
    "in",
    "for",
    "your",
    "has",
    "be",
    "with",
    "are",
    "because",
    "so",
    "than",
    "it",
    "you",
    "will",
    "during",
    "this",
    "that",
    "been",
    "was",
}


@pytest.fixture(scope="module")
def smollm2():
    from mars_ray.models import load_causal_lm, resolve_model

    return load_causal_lm(resolve_model("builtin:smollm2"))


@pytest.mark.slow
def test_smollm2_paraphrases(smollm2):
    from mars_ray.generation.prompts import render

    model, tok = smollm2
    g = LocalChatGenerator(
        "builtin:smollm2",
        GenParams(max_new_tokens=64, no_repeat_ngram_size=3),
        model=model,
        tokenizer=tok,
        batch_size=4,
    )
    out = g.generate([render("paraphrase", text=t) for t in PARA_TEXTS], 1)
    print()
    for src, (para,) in zip(PARA_TEXTS, out):
        print(f"  {src}\n  -> {para}")
        assert para, src
        words = re.findall(r"[a-z']+", para.lower())
        assert len(words) >= 4 and sum(c.isascii() for c in para) / len(para) > 0.95
        assert COMMON_EN & set(words), para  # English
        assert para.strip().lower() != src.lower()
    print(f"  stats {g.stats()}")


def test_a_sampled_slot_does_not_depend_on_its_batch_or_n(llama_parts, t5_parts):
    """The generation bank keys a sampled candidate on (request, slot): the same slot must come out
    whatever other requests share the batch, whatever n, and under either decoding path."""
    for g in both(llama_parts, t5_parts, batch_size=8, temperature=1.0, seed=11):
        alone = g.generate([LONG], 3)[0]
        crowd = g.generate([SHORT, LONG, *REQUESTS[:3]], 5)[1]
        assert crowd[:3] == alone, type(g).__name__
        assert g.generate([LONG], 2, first_slot=3)[0] == crowd[3:5]
        assert len(set(crowd)) > 1  # n samples, not n copies
    # a chat model off the ragged path samples row by row with model.generate: also batch-free
    model, tok = llama_parts
    plain = LocalChatGenerator(
        "tiny-llama", GenParams(max_new_tokens=6, temperature=1.0, seed=11), model=model, tokenizer=tok, ragged=False
    )
    assert plain.generate([SHORT, LONG], 3)[1] == plain.generate([LONG], 3)[0]


def test_a_corrupted_cache_entry_is_detected_regenerated_and_counted(llama_parts, tmp_path):
    """Chaos: one cached text altered on disk (its checksum no longer matches). The next call
    treats it as missing, deletes it, generates it again (the same text: greedy decoding) and
    counts it; the other entries are still hits. A cache from before checksums is trusted."""
    import sqlite3

    inner = chat_gen(llama_parts, batch_size=4)
    cache = GenerationCache(tmp_path / "gen.sqlite")
    first = CachedGenerator(inner, cache).generate(REQUESTS[:3], 1)
    con = sqlite3.connect(tmp_path / "gen.sqlite")
    (key,) = con.execute("SELECT key FROM gen ORDER BY key LIMIT 1").fetchone()
    with con:
        con.execute("UPDATE gen SET text = text || ' [bit rot]' WHERE key = ?", (key,))
    again = CachedGenerator(inner, GenerationCache(tmp_path / "gen.sqlite"))
    out = again.generate(REQUESTS[:3], 1)
    print(f"\n[chaos] corrupted cache entry: 1 altered, {again.stats.corrupt} detected, "
          f"{again.stats.generated} regenerated, {again.stats.hits} hits")  # fmt: skip
    assert out == first and again.stats.corrupt == 1 and again.stats.generated == 1 and again.stats.hits == 2
    assert "[bit rot]" not in json.dumps(out) and len(cache) == 3
    # rows written before checksums existed (NULL digest) are served as they are
    with con:
        con.execute("UPDATE gen SET digest = NULL")
    legacy = CachedGenerator(inner, GenerationCache(tmp_path / "gen.sqlite"))
    assert legacy.generate(REQUESTS[:3], 1) == first and legacy.stats.hits == 3 and legacy.stats.corrupt == 0


def test_sampled_seq2seq_rows_run_as_one_batch_and_depend_on_their_seed_only(t5_parts, monkeypatch):
    """Issue 39, defect 5: sampled T5 paraphrases ran one row per `model.generate` call; now a
    chunk is one call, and each row's sample is the same alone or beside others."""
    g = s2s_gen(t5_parts, batch_size=8, temperature=1.0)
    real, sizes = g.model.generate, []

    def spy(_real=real, _sizes=sizes, **kw):
        _sizes.append(kw["input_ids"].shape[0])
        return _real(**kw)

    monkeypatch.setattr(g.model, "generate", spy)
    together = g.generate(REQUESTS, 3)
    assert sizes == [len(REQUESTS) * 3]  # one call for 5 requests x 3 samples
    alone = g.generate([REQUESTS[1]], 3)
    assert alone[0] == together[1]
    later = g.generate([REQUESTS[1]], 1, first_slot=2)
    assert later[0] == [together[1][2]]  # slot 2 is slot 2 whichever call asks for it
    assert len(set(together[1])) > 1  # three slots, three draws
