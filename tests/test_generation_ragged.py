"""Tests for mars_ray.generation.ragged_decode: greedy decoding with a shared prefix and shrinking batches.

A tiny random Llama (SmolLM2 tokenizer and chat template) in float64, so that the batched forward
passes and one-row ``model.generate`` agree to the last bit on every argmax.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mars_ray.generation import GenParams  # noqa: E402
from mars_ray.generation.local import LocalChatGenerator  # noqa: E402
from mars_ray.generation.ragged_decode import common_prefix_len, ragged_greedy, supports_ragged_greedy  # noqa: E402

TEXTS = [
    "Hi",
    "Please summarise this long and rambling text about rivers and mountains. " * 4,
    "A medium sized request with a few more words.",
    "x y z",
    "Name a colour.",
]


@pytest.fixture(scope="module")
def llama64(tiny_llama_dir):
    from mars_ray.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_llama_dir))
    return model.double().eval(), tok


def _ids(tok, texts, template=True):
    if template:
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": "Rewrite: " + t}], add_generation_prompt=True, tokenize=False
            )
            for t in texts
        ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _reference(model, ids, cap, eos, pad, no_repeat=0):
    """One prompt alone through model.generate, cut at its first EOS."""
    kw = {"max_new_tokens": cap, "do_sample": False, "num_beams": 1, "pad_token_id": pad}
    if no_repeat:
        kw["no_repeat_ngram_size"] = no_repeat
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kw
        )[0, len(ids) :].tolist()
    for j, t in enumerate(out):
        if t in eos:
            return out[: j + 1]
    return out


def test_common_prefix_len():
    assert common_prefix_len([]) == 0
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each row keeps one token of its own
    assert common_prefix_len([[7, 8]]) == 1
    assert common_prefix_len([[1], [2]]) == 0


@pytest.mark.parametrize("no_repeat", [0, 3])
@pytest.mark.parametrize("template", [True, False])
def test_equals_one_row_generate(llama64, no_repeat, template):
    """Every row's tokens are what greedy model.generate gives for that prompt alone, with or
    without a shared prefix (the chat template) and with the no-repeat-n-gram rule."""
    model, tok = llama64
    ids = _ids(tok, TEXTS, template)
    if template:
        assert common_prefix_len(ids) >= 20  # the template's system and user header
    caps = [12, 30, 7, 25, 1]
    eos, pad = {tok.eos_token_id}, tok.pad_token_id
    got = ragged_greedy(model, ids, caps, eos_ids=eos, pad_id=pad, no_repeat_ngram_size=no_repeat)
    for i, (row, cap) in enumerate(zip(ids, caps)):
        assert got[i] == _reference(model, row, cap, eos, pad, no_repeat), i
        assert 1 <= len(got[i]) <= cap


def test_rows_leave_the_batch_and_the_prefix_runs_once(llama64, monkeypatch):
    model, tok = llama64
    ids = _ids(tok, TEXTS)
    p = common_prefix_len(ids)
    calls = []
    real = model.forward

    def spy(*a, cache=None, **kw):
        calls.append(tuple(kw["input_ids"].shape))
        return real(*a, cache=cache, **kw)

    monkeypatch.setattr(model, "forward", spy)
    caps = [3, 9, 5, 9, 1]
    got = ragged_greedy(model, ids, caps, eos_ids=set(), pad_id=tok.pad_token_id)
    assert [len(g) for g in got] == caps  # no EOS: every row runs to its own cap
    assert calls[0] == (1, p)  # the shared prefix, once
    assert calls[1] == (5, max(len(r) for r in ids) - p)  # each row's own prompt tokens
    # then one step per token, computing only the rows still running: 5 rows until the first cap,
    # fewer as rows end, 2 rows (the two caps of 9) at the end
    steps = [b for b, s in calls[2:]]
    assert all(s == 1 for _, s in calls[2:])
    assert len(steps) == max(caps) - 1
    assert steps == sorted(steps, reverse=True) and steps[0] == 4 and steps[-1] == 2
    assert sum(steps) + 5 == sum(caps)  # every computed row-step produced a kept token


def test_eos_ends_a_row_early(llama64):
    model, tok = llama64
    ids = _ids(tok, TEXTS[:3])
    free = ragged_greedy(model, ids, [10, 10, 10], eos_ids=set(), pad_id=tok.pad_token_id)
    stop = free[1][3]  # make row 1's fourth token an end-of-sequence token
    got = ragged_greedy(model, ids, [10, 10, 10], eos_ids={stop}, pad_id=tok.pad_token_id)
    assert got[1] == free[1][:4]
    for i in (0, 2):
        cut = next((j for j, t in enumerate(free[i]) if t == stop), None)
        assert got[i] == (free[i] if cut is None else free[i][: cut + 1])


def test_bad_arguments(llama64):
    model, _tok = llama64
    with pytest.raises(ValueError, match="2 prompts but 1 caps"):
        ragged_greedy(model, [[1, 2], [3]], [4], eos_ids=[], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        ragged_greedy(model, [[1, 2], []], [4, 4], eos_ids=[], pad_id=0)
    assert ragged_greedy(model, [[1, 2], [3]], [0, 0], eos_ids=[], pad_id=0) == [[], []]


def test_generator_takes_the_ragged_path_only_for_greedy_single_outputs(llama64, monkeypatch):
    """LocalChatGenerator: greedy n=1 goes through ragged_greedy (model.generate is not called) and
    gives the same texts as model.generate; beams, sampling and models whose generation config
    adds processors keep model.generate."""
    model, tok = llama64
    g = LocalChatGenerator(
        "tiny", GenParams(max_new_tokens=8, no_repeat_ngram_size=3), model=model, tokenizer=tok, batch_size=8
    )
    assert g._ragged(1) and not g._ragged(2)
    generate_calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: generate_calls.append(kw) or real(**kw))
    fast = g.generate(TEXTS, 1, max_new_tokens=[8, 3, 8, 5, 2])
    assert generate_calls == []
    slow = []
    for t, cap in zip(TEXTS, [8, 3, 8, 5, 2]):
        ids = g.encode(t)
        slow.append(
            [tok.decode(_reference(model, ids, cap, g._eos_ids, g._pad_id, 3), skip_special_tokens=True).strip()]
        )
    assert fast == slow
    before = len(generate_calls)
    g.generate(TEXTS[:2], 2)  # beam search: model.generate
    assert len(generate_calls) == before + 1
    sampler = LocalChatGenerator("tiny", GenParams(max_new_tokens=4, temperature=0.7), model=model, tokenizer=tok)
    assert not sampler._ragged(1)
    model.generation_config.repetition_penalty = 1.3
    try:
        assert not supports_ragged_greedy(model) and not g._ragged(1)
    finally:
        model.generation_config.repetition_penalty = 1.0
    assert supports_ragged_greedy(model)


def test_encoder_decoder_is_not_supported():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    assert not supports_ragged_greedy(t5)


def test_sliding_window_chunked_and_hybrid_models_are_not_supported():
    """Windows count cache slots and recurrent state runs through every slot, so the padding
    between the shared prefix and a row would change such a model's output: it keeps generate."""
    from transformers import Lfm2Config, Lfm2ForCausalLM, MistralConfig, MistralForCausalLM

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    assert not supports_ragged_greedy(MistralForCausalLM(MistralConfig(**base, sliding_window=8)))
    assert supports_ragged_greedy(MistralForCausalLM(MistralConfig(**base, sliding_window=None)))
    assert not supports_ragged_greedy(Lfm2ForCausalLM(Lfm2Config(**base, layer_types=["conv", "full_attention"])))


def test_generation_config_fields_that_change_greedy_decoding_are_refused(llama64):
    model, _ = llama64
    gen = model.generation_config
    for name, value in (
        ("guidance_scale", 1.5),
        ("remove_invalid_values", True),
        ("max_time", 5.0),
        ("min_new_tokens", 3),
        ("repetition_penalty", 1.2),
    ):
        old = getattr(gen, name)
        setattr(gen, name, value)
        try:
            assert not supports_ragged_greedy(model), name
        finally:
            setattr(gen, name, old)
    gen.min_new_tokens = 0  # zero is the same as unset
    try:
        assert supports_ragged_greedy(model)
    finally:
        gen.min_new_tokens = None


def test_peft_wrapped_model_gets_the_cache_argument_of_the_model_it_wraps(llama64):
    """A peft wrapper's forward takes **kwargs, so the cache argument's name comes from the
    wrapped model; the outputs are those of one-row generate on the wrapped model."""
    import copy
    import inspect

    peft = pytest.importorskip("peft")
    model, tok = llama64
    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    base = wrapped.get_base_model()
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero adapters, so the wrapper changes the outputs
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    seen = []
    hook = base.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    ids, caps = _ids(tok, TEXTS[:3]), [6, 4, 5]
    eos, pad = {tok.eos_token_id}, tok.pad_token_id
    try:
        got = ragged_greedy(wrapped, ids, caps, eos_ids=eos, pad_id=pad)
    finally:
        hook.remove()
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    assert seen and all(name in kw for kw in seen)
    assert got == [_reference(wrapped, row, cap, eos, pad) for row, cap in zip(ids, caps)]
    assert got != ragged_greedy(model, ids, caps, eos_ids=eos, pad_id=pad)  # the adapters took part


def test_sampling_at_the_greedy_limits_is_greedy(llama64):
    """Sampling through the same loop: at a vanishing temperature, or a nucleus that holds one
    token, every row is the greedy row (prefix sharing, padding and per-row cache stay exact)."""
    from mars_ray.generation.ragged_decode import ragged_decode

    model, tok = llama64
    ids = _ids(tok, TEXTS)
    caps = [12, 30, 7, 25, 1]
    eos, pad = {tok.eos_token_id}, tok.pad_token_id
    greedy = ragged_greedy(model, ids, caps, eos_ids=eos, pad_id=pad, no_repeat_ngram_size=3)
    seeds = list(range(len(ids)))
    for t, p in ((1e-6, 1.0), (1.0, 1e-9)):
        got = ragged_decode(
            model, ids, caps, eos_ids=eos, pad_id=pad, no_repeat_ngram_size=3, temperature=t, top_p=p, seeds=seeds
        )
        assert got == greedy, (t, p)


def test_sampled_rows_depend_on_their_seed_only(llama64):
    from mars_ray.generation.ragged_decode import ragged_decode

    model, tok = llama64
    ids = _ids(tok, TEXTS)
    eos, pad = {tok.eos_token_id}, tok.pad_token_id
    kw = dict(eos_ids=eos, pad_id=pad, temperature=1.0, top_p=0.9)
    together = ragged_decode(model, ids, [10] * len(ids), seeds=[7, 8, 9, 10, 11], **kw)
    alone = ragged_decode(model, [ids[2]], [10], seeds=[9], **kw)
    assert together[2] == alone[0]  # the same row, seed and cap in another batch
    again = ragged_decode(model, [ids[2], ids[2]], [10, 10], seeds=[9, 99], **kw)
    assert again[0] == alone[0] and again[1] != alone[0]  # another seed, another sample
    with pytest.raises(ValueError, match="one seed per prompt"):
        ragged_decode(model, ids, [4] * len(ids), seeds=[1], **kw)


def test_sampler_draws_from_the_tempered_nucleus_distribution():
    """The on-device sampler (Gumbel-max with one generator per row): token frequencies over many
    seeds match softmax(logits / T), the nucleus cut leaves only its tokens, and the draw stays on
    the logits' device with no host copy of the vocabulary."""
    import torch

    from mars_ray.generation.ragged_decode import row_sampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    t, n = 0.8, 4000
    want = torch.softmax(logits[0] / t, dim=-1)
    counts = torch.zeros(5)
    for s in range(n):
        counts[int(row_sampler(t, 1.0, [s])(logits, [0])[0])] += 1
    freq = counts / n
    assert torch.all((freq - want).abs() < 4 * torch.sqrt(want * (1 - want) / n) + 1e-3), (freq, want)
    # top_p 0.7: token 0 alone holds 0.72, so it is the nucleus; top_p 0.9 adds token 1 (0.92)
    assert {int(row_sampler(t, 0.7, [s])(logits, [0])[0]) for s in range(300)} == {0}
    assert {int(row_sampler(t, 0.9, [s])(logits, [0])[0]) for s in range(300)} == {0, 1}
    # one generator per row: a row's draw is the same whatever rows share its batch
    batch = row_sampler(1.0, 0.9, [5, 6, 7])(logits.repeat(3, 1), [0, 1, 2])
    alone = row_sampler(1.0, 0.9, [6])(logits, [0])
    assert int(batch[1]) == int(alone[0]) and batch.device == logits.device
