"""TRL's four preference layouts, chat-template formatting for decoder backbones (no Ray)."""

from __future__ import annotations

import json

import pytest
from conftest import UF, shared_file, write_jsonl

from mars_ray.config import Config
from mars_ray.core.chat import messages_to_prompt, prompt_messages, split_implicit
from mars_ray.data import read_preferences


def load(path, **over):
    cfg = Config.load(overrides={"data.path": str(path), "data.val_fraction": "0", "data.test_fraction": "0", **over})
    return read_preferences(cfg.data, seed=0)


def by_line(res):
    return {r["source_line"]: r for r in res.table.to_pylist()}


SYS = {"role": "system", "content": "Be brief."}
Q1 = {"role": "user", "content": "What color is the sky?"}
A1 = {"role": "assistant", "content": "Blue, on a clear day."}
Q2 = {"role": "user", "content": "And at night?"}


def test_standard_explicit_and_implicit(tmp_path):
    explicit = write_jsonl(
        tmp_path / "explicit.jsonl",
        [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}],
    )
    implicit = write_jsonl(
        tmp_path / "implicit.jsonl",
        [
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            # the shared prefix "The sky is bl" ends inside a word: the split goes back to the space
            {"chosen": "The sky is blue.", "rejected": "The sky is black."},
            # nothing in common: an empty prompt (legal), both texts whole
            {"chosen": "Yes.", "rejected": "No."},
            # HH transcripts still split after the last shared Assistant turn
            {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."},
        ],
    )
    e = load(explicit)
    assert e.report["formats"][str(explicit)] == "pairs"
    (row,) = e.table.to_pylist()
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("The sky is", " blue.", " green.")
    i = load(implicit)
    assert i.report["formats"][str(implicit)] == "hh-rlhf" and i.report["quarantined"] == 0
    rows = by_line(i)
    assert (rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"]) == ("The sky is", "blue.", "green.")
    assert (rows[2]["prompt"], rows[2]["chosen"], rows[2]["rejected"]) == ("The sky is", "blue.", "black.")
    assert (rows[3]["prompt"], rows[3]["chosen"], rows[3]["rejected"]) == ("", "Yes.", "No.")
    assert rows[4]["prompt"] == "\n\nHuman: hi\n\nAssistant:" and rows[4]["chosen"] == "Hello!"


def test_conversational_explicit_and_implicit(tmp_path):
    rows = [
        # explicit: prompt messages, one assistant message per side
        {"prompt": [Q1], "chosen": [A1], "rejected": [{"role": "assistant", "content": "Green."}]},
        # explicit, multi-turn with a system message
        {
            "prompt": [SYS, Q1, A1, Q2],
            "chosen": [{"role": "assistant", "content": "Dark."}],
            "rejected": [{"role": "assistant", "content": "Purple."}],
        },
        # implicit: the whole exchange on both sides
        {"chosen": [Q1, A1], "rejected": [Q1, {"role": "assistant", "content": "Green."}]},
        {
            "chosen": [SYS, Q1, A1, Q2, {"role": "assistant", "content": "Dark."}],
            "rejected": [SYS, Q1, A1, Q2, {"role": "assistant", "content": "Purple."}],
        },
        # malformed: the sides disagree on the conversation; the last turn is the user's
        {"chosen": [Q1, A1], "rejected": [Q2, A1]},
        {"chosen": [Q1, A1, Q2], "rejected": [Q1, A1]},
        {"prompt": [{"role": "narrator", "content": "x"}], "chosen": [A1], "rejected": [A1]},
    ]
    exp = load(write_jsonl(tmp_path / "explicit.jsonl", rows[:2]))
    imp = load(write_jsonl(tmp_path / "implicit.jsonl", rows[2:4]))
    bad = load(
        write_jsonl(tmp_path / "bad.jsonl", [rows[0], *rows[4:]]),
        **{"data.max_bad_fraction": "1.0", "data.format": "conversational"},
    )
    for res, name in ((exp, "explicit"), (imp, "implicit")):
        assert res.report["formats"][str(tmp_path / f"{name}.jsonl")] == "conversational"
        assert res.report["kept"] == 2 and res.report["quarantined"] == 0
    e, i = by_line(exp), by_line(imp)
    assert e[1]["prompt"] == i[1]["prompt"] == "What color is the sky?"
    assert e[1]["chosen"] == "Blue, on a clear day." and i[1]["rejected"] == "Green."
    assert e[1]["pair_id"] == i[1]["pair_id"]  # the same pair in two layouts is the same pair
    multi = e[2]["prompt"]
    assert multi == i[2]["prompt"]
    assert multi == (
        "\n\nSystem: Be brief.\n\nHuman: What color is the sky?\n\nAssistant: Blue, on a clear day."
        "\n\nHuman: And at night?\n\nAssistant:"
    )
    assert prompt_messages(multi) == [SYS, Q1, A1, Q2]
    assert bad.report["read"] == 4 and bad.report["kept"] == 1 and bad.report["quarantined"] == 3
    reasons = {(q["line"], q["field"]): q["reason"] for q in bad.quarantine}
    assert "differs from chosen's" in reasons[(2, "rejected")]
    assert "expected 'assistant'" in reasons[(3, "chosen")]
    assert "'narrator'" in reasons[(4, "prompt")]


def test_real_ultrafeedback_rows_in_every_layout_read_to_the_same_pairs(tmp_path):
    path = shared_file(UF)
    src = [json.loads(x) for x in path.read_text().splitlines()[:60]]
    layouts = {
        "standard_explicit": [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in src],
        "conversational_explicit": [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in src
        ],
        "conversational_implicit": [
            {
                "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}],
            }
            for r in src
        ],
        "native": src,  # the file's own rows (UltraFeedback scores in metadata)
    }
    ids = {}
    for name, rows in layouts.items():
        res = load(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert res.report["read"] == 60 and res.report["kept"] + res.report["quarantined"] == 60
        ids[name] = {r["source_line"]: r["pair_id"] for r in res.table.to_pylist()}
    assert ids["standard_explicit"] == ids["conversational_explicit"] == ids["conversational_implicit"] == ids["native"]


def test_prompt_transcript_round_trip():
    for msgs in ([Q1], [SYS, Q1], [Q1, A1, Q2], [SYS, Q1, A1, Q2]):
        assert prompt_messages(messages_to_prompt(msgs)) == msgs
    assert prompt_messages("plain question?") == [{"role": "user", "content": "plain question?"}]
    assert prompt_messages("") == []
    assert split_implicit("a b c", "a b d") == ("a b", "c", "d")


# ------------------------------------------------------------------ chat-template formatting


def test_decoder_backbone_formats_pairs_with_its_chat_template(tiny_llama_dir, tiny_bert_dir):
    from mars_ray.models.reward import encode_pairs, load_reward_model, uses_chat_template

    _, tok = load_reward_model(str(tiny_llama_dir), seed=0, new_head=True)
    assert uses_chat_template(tok)
    prompt = messages_to_prompt([SYS, Q1, A1, Q2])
    enc = encode_pairs(tok, [prompt], ["Dark."], max_prompt_tokens=512, max_response_tokens=64)
    whole = tok.apply_chat_template([SYS, Q1, A1, Q2, {"role": "assistant", "content": "Dark."}], tokenize=False)
    assert enc.input_ids[0] == tok(whole, add_special_tokens=False)["input_ids"]
    # truncation keeps the end of the rendered prompt and the template's closing tokens
    short = encode_pairs(tok, [prompt], ["Dark."], max_prompt_tokens=8, max_response_tokens=64)
    assert short.prompt_truncated == 1 and short.input_ids[0] == enc.input_ids[0][-len(short.input_ids[0]) :]
    # an encoder has no chat template: the plain [CLS] prompt [SEP] response [SEP] pair
    _, btok = load_reward_model(str(tiny_bert_dir), seed=0, new_head=True)
    assert not uses_chat_template(btok)
    benc = encode_pairs(btok, ["What color is the sky?"], ["Blue."], max_prompt_tokens=64, max_response_tokens=64)
    assert benc.input_ids[0] == btok("What color is the sky?", "Blue.")["input_ids"]


_GOOD = ["gracias", "thanks", "merci"]
_WORDS = ["apple", "river", "stone", "cloud", "paper", "light", "green", "table", "music", "north"]


def _conversational_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = {"role": "user", "content": f"question {i}: " + " ".join(rng.choices(_WORDS, k=5))}
        base = rng.choices(_WORDS, k=4)
        good = " ".join(base[:2] + [rng.choice(_GOOD)] + base[2:])
        bad = " ".join(base[:2] + [rng.choice(_WORDS)] + base[2:])
        rows.append(
            {
                "chosen": [q, {"role": "assistant", "content": good}],
                "rejected": [q, {"role": "assistant", "content": bad}],
            }
        )
    return rows


def test_decoder_backbone_trains_and_scores_conversational_pairs(tiny_llama_dir, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.core.losses import pair_metrics
    from mars_ray.train import FitSpec, fit_reward_model

    paths = {}
    for name, n, seed in (("train", 64, 1), ("val", 32, 2)):
        res = load(write_jsonl(tmp_path / f"{name}.jsonl", _conversational_rows(n, seed)))
        assert res.report["kept"] == n
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(res.table, paths[name])
    cfg = Config.load(
        overrides={
            "seed": 0,
            "train.lr": 2e-2,
            "train.batch_size": 8,
            "train.passes": 3,
            "train.lora": False,
            "train.num_workers": 0,
            "train.precision": "fp32",  # the format check below compares margins to 1e-4
            "data.max_prompt_tokens": 96,
            "data.max_response_tokens": 16,
        }
    )
    m = fit_reward_model(
        cfg,
        FitSpec(
            init_model=str(tiny_llama_dir),
            train_path=paths["train"],
            val_path=paths["val"],
            run_dir=tmp_path / "run",
            name="llama",
        ),
    )
    hist = m["train_loss_history"]
    assert np.mean(hist[-4:]) < np.mean(hist[:4]), hist
    # plain transformers on the chat-rendered conversation reproduce the run's validation margins
    mdir = m["model_dir"]
    model = AutoModelForSequenceClassification.from_pretrained(mdir).eval()
    tok = AutoTokenizer.from_pretrained(mdir)
    val = pq.read_table(paths["val"]).to_pylist()

    def reward(prompt: str, response: str) -> float:
        text = tok.apply_chat_template(
            prompt_messages(prompt) + [{"role": "assistant", "content": response}], tokenize=False
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    rc = np.array([reward(r["prompt"], r["chosen"]) for r in val])
    rr = np.array([reward(r["prompt"], r["rejected"]) for r in val])
    assert pair_metrics(rc, rr)["margin_mean"] == pytest.approx(m["val_margin_mean"], abs=1e-4)


# ------------------------------------------------------------------ the margin column


def test_margin_column_is_read_validated_and_inherited(tmp_path):
    import numpy as np

    from mars_ray.core import schema as S
    from mars_ray.core.pairs import SyntheticDraw, draw_synthetic_pairs

    rows = [
        {"prompt": "q1", "chosen": "good one", "rejected": "bad one", "margin": 2.5},
        {"prompt": "q2", "chosen": "good two", "rejected": "bad two"},
        {"chosen": [Q1, A1], "rejected": [Q1, {"role": "assistant", "content": "Green."}], "margin": 1},
        {"prompt": "q4", "chosen": "good", "rejected": "bad", "margin": "strong"},
        {"prompt": "q5", "chosen": "good", "rejected": "bad", "margin": float("inf")},
    ]
    res = load(write_jsonl(tmp_path / "m.jsonl", rows), **{"data.format": "pairs"})
    got = by_line(res)
    assert got[1][S.MARGIN] == 2.5 and got[2][S.MARGIN] is None and got[3][S.MARGIN] == 1.0
    reasons = {q["line"]: (q["field"], q["reason"]) for q in res.quarantine}
    assert reasons[4] == ("margin", "expected a number, got 'strong'")
    assert reasons[5][0] == "margin" and "finite" in reasons[5][1]
    assert res.report["read"] == res.report["kept"] + res.report["quarantined"] == 5
    # synthetic pairs carry their source pair's margin (lineage)
    t = res.table
    pools = SyntheticDraw(
        pair_ids=t.column(S.PAIR_ID).to_pylist(),
        prompts=t.column(S.PROMPT).to_pylist(),
        subsets=t.column(S.SUBSET).to_pylist(),
        chosen=t.column(S.CHOSEN).to_pylist(),
        rejected=t.column(S.REJECTED).to_pylist(),
        kept_chosen=[["para c"]] * t.num_rows,
        kept_rejected=[["para r"]] * t.num_rows,
        budgets=np.full(t.num_rows, 2),
        refined=np.zeros(t.num_rows, bool),
        q=np.full(t.num_rows, 1 / t.num_rows),
        margins=t.column(S.MARGIN).to_pylist(),
    )
    syn = draw_synthetic_pairs(pools, seed=0, epoch=1, generator="g", refined_generator="g")
    by_source = {r[S.PAIR_ID]: r[S.MARGIN] for r in t.to_pylist()}
    assert len(syn) == 2 * t.num_rows
    assert all(r[S.MARGIN] == by_source[r[S.SOURCE_PAIR_ID]] for r in syn)
