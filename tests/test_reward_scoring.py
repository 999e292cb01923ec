"""Reward model encoding/scoring (mars_ray.models.reward) and the margin-scoring stage.

Most tests use the tiny random BERT (MiniLM tokenizer) and the tiny Llama (SmolLM2 tokenizer);
Ray tests share the session's local Ray; the real MiniLM on real HH-RLHF pairs is ``slow``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import HH, shared_file

from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.models.reward import (
    encode_pairs,
    encode_preferences,
    length_chunks,
    load_reward_model,
    score_pairs,
    score_texts,
)
from mars_ray.stages.score import SCORE_SCHEMA, ScoreActor, score_margins, score_margins_local

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
]


def _text(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def _pairs_table(n: int, seed: int = 0) -> pa.Table:
    """Pairs of very different lengths (so length sorting really reorders them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = _text(int(rng.integers(1, 120)), i)
        c = _text(int(rng.integers(1, 60)), i + 3) + f" yes {i}"
        r = _text(int(rng.integers(1, 60)), i + 7) + f" no {i}"
        rows.append(S.human_row(prompt=p, chosen=c, rejected=r))
    return pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA)


def _cfg(**over) -> Config:
    base = {"resources.batch_size": 8, "data.max_prompt_tokens": 64, "data.max_response_tokens": 32}
    return Config.load(overrides={**base, **over})


# These check encoding and batching rules to 1e-5 (padding invariance, batch order), so they pin
# fp32: in bf16 a batch's shape moves the last bits. The bf16 path is tests/test_precision.py's.
@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return load_reward_model(str(tiny_bert_dir), seed=0, dtype="float32", new_head=True)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_reward_model(str(tiny_llama_dir), seed=0, dtype="float32", new_head=True)


@pytest.fixture(scope="module")
def llama_plain(llama):
    """The tiny Llama with a tokenizer that has no chat template: the plain decoder formatting
    (``p r EOS``). With its template, pairs are chat-formatted (tests/test_trl_layouts.py)."""
    import copy

    model, tok = llama
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    return model, tok


# ------------------------------------------------------------------------------------ encoding


def test_encode_keeps_prompt_end_and_response_start(bert):
    _, tok = bert
    prompt = " ".join(f"p{i}" for i in range(40))  # "p0 p1 ... p39"
    response = " ".join(f"r{i}" for i in range(40))
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    enc = encode_pairs(tok, [prompt], [response], max_prompt_tokens=10, max_response_tokens=7)
    ids = enc.input_ids[0]
    assert ids == [tok.cls_token_id, *p_ids[-10:], tok.sep_token_id, *r_ids[:7], tok.sep_token_id]
    text = tok.decode(ids)
    assert text.startswith("[CLS]") and "p39 [SEP]" in text  # the END of the prompt is kept
    assert tok.decode(r_ids[:7]) in text and text.index("[SEP]") < text.index("r0")  # response START
    assert "p0 " not in text and "r39" not in text
    assert (enc.prompt_truncated, enc.response_truncated) == (1, 1)
    # segment ids as the tokenizer's own pair encoding gives them
    assert enc.token_type_ids[0] == [0] * 12 + [1] * 8


def test_encode_matches_tokenizer_pair_encoding_when_nothing_is_cut(bert):
    _, tok = bert
    prompts, responses = ["Human: hi there.\n\nAssistant:", "what is 2+2?"], ["Hello!", "It is four, of course."]
    enc = encode_pairs(tok, prompts, responses, max_prompt_tokens=512, max_response_tokens=192)
    ref = tok(prompts, responses, return_token_type_ids=True)
    assert enc.input_ids == ref["input_ids"]
    assert enc.token_type_ids == ref["token_type_ids"]
    assert (enc.prompt_truncated, enc.response_truncated) == (0, 0)


def test_no_pair_dropped_and_model_limit_respected(bert):
    model, tok = bert
    assert tok.model_max_length == model.config.max_position_embeddings == 512
    long_prompt, long_resp = _text(2000), _text(1000, 5)
    prompts = [long_prompt, "short", long_prompt, ""]
    responses = [long_resp, long_resp, "ok", "fine"]
    enc = encode_pairs(tok, prompts, responses, max_prompt_tokens=512, max_response_tokens=192)
    assert len(enc) == 4
    assert all(len(x) <= 512 for x in enc.input_ids)
    # 512 + 192 + 3 specials do not fit 512 positions: the prompt gives way, the response keeps 192
    assert len(enc.input_ids[0]) == 512 and enc.input_ids[0][-194:-1] == enc.input_ids[1][-194:-1]
    assert len(enc.input_ids[1]) == 3 + 1 + 192  # "short" is one token
    assert enc.prompt_truncated == 2 and enc.response_truncated == 2
    # the stricter limit wins when given explicitly
    small = encode_pairs(tok, prompts, responses, max_prompt_tokens=512, max_response_tokens=192, max_length=64)
    assert len(small) == 4 and max(len(x) for x in small.input_ids) == 64
    r = score_texts(model, tok, prompts, responses, batch_size=2, max_prompt_tokens=512, max_response_tokens=192)
    assert r.shape == (4,) and r.dtype == np.float32 and np.isfinite(r).all()


def test_encode_preferences_equals_two_encode_pairs(bert):
    _, tok = bert
    t = _pairs_table(6)
    p, c, r = (t.column(k).to_pylist() for k in (S.PROMPT, S.CHOSEN, S.REJECTED))
    kw = dict(max_prompt_tokens=20, max_response_tokens=8)
    ec, er = encode_preferences(tok, p, c, r, **kw)
    assert ec == encode_pairs(tok, p, c, **kw)
    assert er == encode_pairs(tok, p, r, **kw)


def test_decoder_encoding_ends_with_eos(llama_plain):
    _, tok = llama_plain
    enc = encode_pairs(tok, ["a b c d e f g"], ["one two three four"], max_prompt_tokens=3, max_response_tokens=2)
    ids = enc.input_ids[0]
    r_ids = tok("one two three four", add_special_tokens=False)["input_ids"]
    p_ids = tok("a b c d e f g", add_special_tokens=False)["input_ids"]
    assert ids == [*p_ids[-3:], *r_ids[:2], tok.eos_token_id]
    assert enc.token_type_ids is None


# ------------------------------------------------------------------------------------ model


def test_same_seed_same_scores_different_seed_different_head(tiny_bert_dir, bert):
    import torch

    m0, tok = bert
    m0b, _ = load_reward_model(str(tiny_bert_dir), seed=0, dtype="float32", new_head=True)
    m1, _ = load_reward_model(str(tiny_bert_dir), seed=1, dtype="float32", new_head=True)
    assert torch.equal(m0.classifier.weight, m0b.classifier.weight)
    # a fresh head is drawn in fp32 from the seed, whatever dtype the body is loaded in
    m0h, _ = load_reward_model(str(tiny_bert_dir), seed=0, dtype="bfloat16", new_head=True)
    assert m0h.classifier.weight.dtype == torch.float32 and torch.equal(m0.classifier.weight, m0h.classifier.weight)
    assert not torch.equal(m0.classifier.weight, m1.classifier.weight)
    # the backbone comes from the checkpoint, not from the seed
    assert torch.equal(m0.bert.embeddings.word_embeddings.weight, m1.bert.embeddings.word_embeddings.weight)
    t = _pairs_table(10)
    args = [t.column(k).to_pylist() for k in (S.PROMPT, S.CHOSEN, S.REJECTED)]
    kw = dict(batch_size=4, max_prompt_tokens=64, max_response_tokens=32)
    a = score_pairs(m0, tok, *args, **kw)
    b = score_pairs(m0b, tok, *args, **kw)
    c = score_pairs(m1, tok, *args, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


def test_loading_does_not_touch_global_rng(tiny_bert_dir):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_reward_model(str(tiny_bert_dir), seed=7, new_head=True)
    assert torch.equal(torch.rand(3), expected)


def test_batched_equals_one_at_a_time_and_order_restored(bert):
    model, tok = bert
    t = _pairs_table(13)
    prompts, chosen = t.column(S.PROMPT).to_pylist(), t.column(S.CHOSEN).to_pylist()
    kw = dict(max_prompt_tokens=64, max_response_tokens=32)
    batched = score_texts(model, tok, prompts, chosen, batch_size=5, **kw)
    single = np.array([score_texts(model, tok, [p], [c], batch_size=1, **kw)[0] for p, c in zip(prompts, chosen)])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    # scores follow their inputs (not the length-sorted order): reversing the input reverses them
    rev = score_texts(model, tok, prompts[::-1], chosen[::-1], batch_size=5, **kw)
    np.testing.assert_allclose(rev[::-1], batched, atol=1e-5, rtol=0)
    lengths = encode_pairs(tok, prompts, chosen, **kw).lengths
    assert not np.all(np.diff(lengths) <= 0)  # the input really was not length-sorted
    assert len(set(np.round(single, 6))) > 1  # scores really differ between texts


def test_length_chunks_bound_rows_and_padded_slots():
    lengths = np.array([10, 300, 40, 35, 600, 20, 45, 5])
    assert [list(c) for c in length_chunks(lengths, batch_size=3)] == [[4, 1, 6], [2, 3, 5], [0, 7]]
    chunks = length_chunks(lengths, batch_size=4, max_tokens=200)
    assert [list(c) for c in chunks] == [[4], [1], [6, 2, 3, 5], [0, 7]]  # 600 and 300 alone: over the budget
    for c in chunks:
        assert len(c) <= 4 and (len(c) == 1 or len(c) * lengths[c].max() <= 200)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))  # every row exactly once
    assert length_chunks(np.array([], dtype=np.int64), batch_size=4, max_tokens=64) == []
    with pytest.raises(ValueError):
        length_chunks(lengths, batch_size=0)
    with pytest.raises(ValueError):
        length_chunks(lengths, batch_size=2, max_tokens=0)


def test_token_budget_changes_batches_not_rewards(bert):
    model, tok = bert
    t = _pairs_table(13)
    prompts, chosen = t.column(S.PROMPT).to_pylist(), t.column(S.CHOSEN).to_pylist()
    kw = dict(max_prompt_tokens=64, max_response_tokens=32)
    plain = score_texts(model, tok, prompts, chosen, batch_size=13, **kw)
    budgeted = score_texts(model, tok, prompts, chosen, batch_size=13, max_tokens=64, **kw)
    np.testing.assert_allclose(budgeted, plain, atol=1e-5, rtol=0)
    lengths = encode_pairs(tok, prompts, chosen, **kw).lengths
    assert len(length_chunks(lengths, batch_size=13, max_tokens=64)) > 1  # the budget really split the batch


def test_score_pairs_equals_score_texts(bert):
    model, tok = bert
    t = _pairs_table(9)
    p, c, r = (t.column(k).to_pylist() for k in (S.PROMPT, S.CHOSEN, S.REJECTED))
    kw = dict(batch_size=4, max_prompt_tokens=64, max_response_tokens=32)
    rc, rr = score_pairs(model, tok, p, c, r, **kw)
    np.testing.assert_allclose(rc, score_texts(model, tok, p, c, **kw), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rr, score_texts(model, tok, p, r, **kw), atol=1e-5, rtol=0)


def test_decoder_last_token_pooling_and_padding_invariance(llama_plain):
    import torch

    model, tok = llama_plain
    assert model.config.pad_token_id == tok.pad_token_id is not None
    kw = dict(max_prompt_tokens=256, max_response_tokens=128)
    short_p, short_r = "Human: hi", "Hello there, friend."
    long_p, long_r = _text(150), _text(90, 3)
    alone = score_texts(model, tok, [short_p], [short_r], batch_size=1, **kw)[0]
    together = score_texts(model, tok, [long_p, short_p], [long_r, short_r], batch_size=2, **kw)
    assert abs(together[1] - alone) < 1e-5  # right padding to the long text changes nothing
    # pooling is at the last non-pad token: recompute it by hand from the hidden states
    ids = encode_pairs(tok, [short_p], [short_r], **kw).input_ids[0]
    x = torch.tensor([ids])
    with torch.inference_mode():
        hidden = model.model(input_ids=x).last_hidden_state[0]
        logits = model.score(hidden)[:, 0]
    non_pad = [i for i, t in enumerate(ids) if t != tok.pad_token_id]
    assert abs(float(logits[non_pad[-1]]) - alone) < 1e-5
    # with pad == EOS (SmolLM2) the pooled token is the response's last token, just before the EOS
    assert ids[-1] == tok.eos_token_id
    assert non_pad[-1] == (len(ids) - 2 if tok.pad_token_id == tok.eos_token_id else len(ids) - 1)
    # responses differing only in their last word score differently: pooling sees the very end
    other = score_texts(model, tok, [short_p], ["Hello there, enemy."], batch_size=1, **kw)[0]
    assert abs(other - alone) > 1e-6


def test_decoder_without_pad_token_gets_eos_as_pad(tiny_llama_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "nopad"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["pad_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    model, tok = load_reward_model(str(d), seed=0, new_head=True)
    assert tok.pad_token_id == tok.eos_token_id is not None
    assert model.config.pad_token_id == tok.eos_token_id
    r = score_texts(
        model,
        tok,
        ["a", "a much longer prompt than the other one"],
        ["b", "c"],
        batch_size=2,
        max_prompt_tokens=32,
        max_response_tokens=8,
    )
    assert np.isfinite(r).all()


# ------------------------------------------------------------------------------------ stage


def test_actor_returns_pair_ids_and_float64(tiny_bert_dir):
    actor = ScoreActor(
        str(tiny_bert_dir),
        seed=0,
        dtype="auto",
        max_prompt_tokens=64,
        max_response_tokens=32,
        batch_size=4,
        num_threads=None,
        new_head=True,  # the backbone's new head: these check the stage, not the model
    )
    t = _pairs_table(5)
    batch = {k: t.column(k).to_numpy(zero_copy_only=False) for k in (S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED)}
    out = actor(batch)
    assert set(out) == {S.PAIR_ID, "reward_chosen", "reward_rejected", "margin"}
    assert list(out[S.PAIR_ID]) == t.column(S.PAIR_ID).to_pylist()
    assert out["margin"].dtype == np.float64
    np.testing.assert_allclose(out["margin"], out["reward_chosen"] - out["reward_rejected"])


def test_score_margins_local_order_and_schema(tiny_bert_dir):
    cfg = _cfg(**{"model.reward": str(tiny_bert_dir)})  # the run's own backbone: scored with its new head
    t = _pairs_table(21)
    out = score_margins_local(t, model_ref=str(tiny_bert_dir), cfg=cfg)
    assert out.schema == SCORE_SCHEMA
    assert out.column(S.PAIR_ID).to_pylist() == t.column(S.PAIR_ID).to_pylist()  # input order
    model, tok = load_reward_model(str(tiny_bert_dir), seed=cfg.seed, new_head=True)
    rc = score_texts(
        model,
        tok,
        t.column(S.PROMPT).to_pylist(),
        t.column(S.CHOSEN).to_pylist(),
        batch_size=3,
        max_prompt_tokens=64,
        max_response_tokens=32,
    )
    np.testing.assert_allclose(out.column("reward_chosen").to_numpy(), rc, atol=1e-5, rtol=0)
    assert score_margins_local(t.slice(0, 0), model_ref=str(tiny_bert_dir), cfg=cfg).num_rows == 0
    with pytest.raises(ValueError, match="lacks column"):
        score_margins_local(t.drop_columns([S.REJECTED]), model_ref=str(tiny_bert_dir), cfg=cfg)


@pytest.mark.ray
def test_ray_stage_equals_local(ray_local, tiny_bert_dir):
    cfg = _cfg(**{"resources.actors": 2, "resources.cpus_per_actor": 1.0, "model.reward": str(tiny_bert_dir)})
    t = _pairs_table(45)
    local = score_margins_local(t, model_ref=str(tiny_bert_dir), cfg=cfg)
    remote = score_margins(t, model_ref=str(tiny_bert_dir), cfg=cfg)
    assert remote.schema == SCORE_SCHEMA
    ids = remote.column(S.PAIR_ID).to_pylist()
    assert sorted(ids) == sorted(t.column(S.PAIR_ID).to_pylist()) and len(set(ids)) == t.num_rows
    assert ids == t.column(S.PAIR_ID).to_pylist()
    for col in ("reward_chosen", "reward_rejected", "margin"):
        np.testing.assert_allclose(remote.column(col).to_numpy(), local.column(col).to_numpy(), atol=1e-5, rtol=0)
    # a different seed is a different head, through Ray too
    other = score_margins(t, model_ref=str(tiny_bert_dir), cfg=_cfg(seed=1, **{"model.reward": str(tiny_bert_dir)}))
    assert not np.allclose(other.column("margin").to_numpy(), remote.column("margin").to_numpy())


# ------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_minilm_on_real_hh_pairs():
    from mars_ray.data import read_preferences

    path = shared_file(HH)
    cfg = Config.load(overrides={"data.path": str(path), "resources.batch_size": 16})
    t = read_preferences(cfg.data, seed=cfg.seed).table.slice(0, 32)  # sized down (was 64 pairs)
    assert t.num_rows == 32
    out = score_margins_local(t, model_ref="builtin:minilm", cfg=cfg)
    assert out.num_rows == 32 and out.column(S.PAIR_ID).to_pylist() == t.column(S.PAIR_ID).to_pylist()
    m = out.column("margin").to_numpy()
    assert np.isfinite(m).all() and np.std(m) > 0
    # every pair fits MiniLM's 512 positions, and the responses' starts survive
    model, tok = load_reward_model("builtin:minilm", new_head=True)
    ec, er = encode_preferences(
        tok,
        *(t.column(k).to_pylist() for k in (S.PROMPT, S.CHOSEN, S.REJECTED)),
        max_prompt_tokens=512,
        max_response_tokens=192,
    )
    assert len(ec) == len(er) == 32 and max(max(ec.lengths), max(er.lengths)) <= 512
    rc, rr = score_pairs(
        model,
        tok,
        *(t.column(k).to_pylist() for k in (S.PROMPT, S.CHOSEN, S.REJECTED)),
        batch_size=16,
        max_prompt_tokens=512,
        max_response_tokens=192,
    )
    np.testing.assert_allclose(rc - rr, m, atol=1e-4, rtol=0)
