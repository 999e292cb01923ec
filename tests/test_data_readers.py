"""Every reader on real rows from ../shared/data and on hand-made malformed files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HH, LLMBAR, PKU, UF, head_lines, shared_file, write_jsonl

from mars_ray.config import Config, DataConfig
from mars_ray.core.schema import PAIR_SCHEMA
from mars_ray.data import DataFileError, read_preferences
from mars_ray.data.formats import split_hh_transcripts


def load(path, **over):
    cfg = Config.load(overrides={"data.path": str(path), **{f"data.{k}": v for k, v in over.items()}})
    return read_preferences(cfg.data, seed=cfg.seed)


def assert_counts(res):
    r = res.report
    assert r["read"] == r["kept"] + r["quarantined"] == r["selected"] + r["not_selected"] + r["quarantined"]
    assert res.table.num_rows == r["selected"] == sum(r["splits"].values())
    assert len(res.quarantine) == r["quarantined"]
    assert res.table.schema.equals(PAIR_SCHEMA)


# ------------------------------------------------------------------ real rows


def test_hh_rlhf_whole_file():
    res = load(shared_file(HH))
    assert_counts(res)
    assert res.report["formats"][str(shared_file(HH))] == "hh-rlhf"
    assert res.report["read"] == 2354
    reasons = res.report["quarantine_reasons"]
    assert reasons.get("chosen,rejected: chosen == rejected (no preference to learn)") == 2
    rows = res.table.to_pylist()
    for r in rows[:200]:
        assert r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith("\n\nAssistant:")
        assert not r["chosen"].startswith(" ") and r["chosen"] != r["rejected"]


def test_hh_split_keeps_earlier_turns_in_the_prompt():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Like this."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: No."
    p, c, r = split_hh_transcripts(chosen, rejected)
    assert p == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (c, r) == ("Like this.", "No.")
    # Responses sharing their first words still split at the last shared Assistant turn.
    p, c, r = split_hh_transcripts("\n\nHuman: q\n\nAssistant: Sure, yes", "\n\nHuman: q\n\nAssistant: Sure, no")
    assert (p, c, r) == ("\n\nHuman: q\n\nAssistant:", "Sure, yes", "Sure, no")


def test_pku_binarised_file():
    res = load(shared_file(PKU))
    assert_counts(res)
    assert res.report["kept"] == 3590 and res.report["quarantined"] == 0
    # All pairs of a prompt stay in one split (930 prompts).
    by_prompt = {}
    for r in res.table.select(["prompt", "split"]).to_pylist():
        by_prompt.setdefault(r["prompt"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_prompt.values())


@pytest.mark.parametrize("label,expected", [("safer", "B"), ("better", "A")])
def test_pku_native_rows_follow_the_configured_label(tmp_path, label, expected):
    row = {
        "prompt": "p",
        "response_0": "A",
        "response_1": "B",
        "better_response_id": 0,
        "safer_response_id": 1,
        "is_response_0_safe": False,
        "is_response_1_safe": True,
    }
    res = load(write_jsonl(tmp_path / "pku.jsonl", [row]), pku_label=label, val_fraction="0", test_fraction="0")
    assert res.table.column("chosen").to_pylist() == [expected]
    bad = dict(row, safer_response_id=2)
    with pytest.raises(DataFileError, match="safer_response_id: expected 0 or 1"):
        load(write_jsonl(tmp_path / "bad.jsonl", [bad]))


def test_ultrafeedback_strings_ties_and_identical():
    res = load(shared_file(UF))
    assert_counts(res)
    assert res.report["flags"]["score_tie"] >= 130
    assert "chosen,rejected: chosen == rejected (no preference to learn)" in res.report["quarantine_reasons"]
    meta = json.loads(res.table.column("meta")[0].as_py())
    assert "score_chosen" in meta


def test_ultrafeedback_message_lists(tmp_path):
    row = {
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad."}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    broken = {"chosen": [{"role": "user", "content": "Q?"}], "rejected": [{"role": "user"}]}
    res = load(
        write_jsonl(tmp_path / "uf.jsonl", [row, broken]),
        format="ultrafeedback",
        val_fraction="0",
        test_fraction="0",
        max_bad_fraction="1",
    )
    assert res.table.select(["prompt", "chosen", "rejected"]).to_pylist() == [
        {"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}
    ]
    assert res.quarantine[0]["line"] == 2 and "assistant" in res.quarantine[0]["reason"]


def test_rewardbench_llmbar_subsets():
    res = load(shared_file(LLMBAR))
    assert_counts(res)
    subsets = set(res.table.column("subset").to_pylist())
    assert {
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    } <= subsets


def test_rewardbench_requires_subset(tmp_path):
    res = load(
        write_jsonl(
            tmp_path / "rb.jsonl",
            [
                {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "x"},
                {"prompt": "p", "chosen": "a", "rejected": "c"},
            ],
        ),
        format="rewardbench",
        max_bad_fraction="1",
    )
    assert res.quarantine[0]["field"] == "subset"


# ------------------------------------------------------------------ generic files


def _rows():
    return [{"question": f"q{i}", "good": f"good {i}", "bad": f"bad {i}"} for i in range(20)]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_generic_formats_with_column_mapping(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"d.{suffix}"
    df = pd.DataFrame(_rows())
    {
        "jsonl": lambda: df.to_json(path, orient="records", lines=True),
        "json": lambda: df.to_json(path, orient="records"),
        "csv": lambda: df.to_csv(path, index=False),
        "parquet": lambda: df.to_parquet(path),
    }[suffix]()
    res = load(path, format="generic", columns="{prompt: question, chosen: good, rejected: bad}")
    assert_counts(res)
    assert res.report["kept"] == 20
    assert sorted(res.table.column("chosen").to_pylist()) == sorted(f"good {i}" for i in range(20))
    assert sorted(res.table.column("source_line").to_pylist()) == list(
        range(2, 22) if suffix == "csv" else range(1, 21)
    )


def test_generic_mapping_names_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "good": "a"}] * 3)
    with pytest.raises(DataFileError, match=r"bad: missing \(mapped from rejected\)"):
        load(path, format="generic", columns="{prompt: question, chosen: good, rejected: bad}")


# ------------------------------------------------------------------ malformed input


def test_malformed_jsonl_every_row_accounted_for(tmp_path):
    good = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    path = tmp_path / "m.jsonl"
    with path.open("wb") as f:
        for r in good:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(b'{"prompt": "x", "chosen": "y"\n')  # 11 truncated JSON
        f.write(b'{"prompt": "x", "chosen": "\xff\xfe", "rejected": "z"}\n')  # 12 invalid UTF-8
        f.write(b"[1, 2]\n")  # 13 not an object
        f.write(b'{"prompt": "x", "chosen": 5, "rejected": "z"}\n')  # 14 non-string
        f.write(b'{"prompt": "x", "chosen": "   ", "rejected": "z"}\n')  # 15 whitespace
        f.write(b'{"prompt": "x", "chosen": "same", "rejected": "same"}\n')  # 16 identical
        f.write(json.dumps(good[0]).encode() + b"\n")  # 17 duplicate of line 1
        f.write(b'{"prompt": "x", "rejected": "z"}\n')  # 18 missing chosen
        f.write(b"\n")  # blank: not a row
    res = load(path, max_bad_fraction="0.9")
    assert_counts(res)
    assert res.report["read"] == 18 and res.report["kept"] == 10
    by_line = {q["line"]: q for q in res.quarantine}
    assert set(by_line) == set(range(11, 19))
    assert "not valid JSON" in by_line[11]["reason"]
    assert "invalid UTF-8" in by_line[12]["reason"] and "\\xff" in by_line[12]["raw"]
    assert "expected a JSON object" in by_line[13]["reason"]
    assert by_line[14]["field"] == "chosen" and "expected a string" in by_line[14]["reason"]
    assert "whitespace" in by_line[15]["reason"]
    assert "chosen == rejected" in by_line[16]["reason"]
    assert by_line[17]["reason"] == "duplicate pair" and by_line[17]["duplicate_of"]["line"] == 1
    assert by_line[18]["field"] == "chosen" and by_line[18]["reason"] == "missing"
    for q in res.quarantine:
        assert {"file", "line", "field", "reason", "raw"} <= set(q)


def test_keep_identical_flags_instead(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"}],
    )
    res = load(path, keep_identical="true")
    assert res.report["quarantined"] == 0 and res.report["flags"] == {"identical": 1}


def test_csv_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,chosen,rejected\np1,a,b\np2,a\np3,\xff,b\np4,"multi\nline",c\n')
    res = load(path, max_bad_fraction="0.9")
    assert_counts(res)
    lines = {q["line"]: q["reason"] for q in res.quarantine}
    assert "cells" in lines[3] and "UTF-8" in lines[4]
    assert res.table.filter(pa.compute.equal(res.table["prompt"], "p4"))["source_line"].to_pylist() == [5]


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("missing.jsonl", None, "file not found"),
        ("d.txt", b"hello", "unknown file type"),
        ("d.json", b"{not json", "not valid JSON"),
        ("d.json", b'{"a": 1}', "expected a JSON array"),
        ("d.json", b"[\xff]", "invalid UTF-8"),
        ("d.csv", b"", "empty CSV"),
        ("d.parquet", b"PAR1garbage", "unreadable parquet"),
        ("d.jsonl", b'{"x": 1, "y": 2}\n', "cannot tell the format.*--data.format"),
        ("d.jsonl", b"nope\nnope\n", "2 of 2 rows unusable.*line 1"),
        ("d.jsonl", b"\n\n", "no rows"),
    ],
)
def test_unusable_files_raise_clear_errors_naming_the_file(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataFileError, match=pattern) as e:
        load(path)
    assert name in str(e.value)


def test_hub_dataset_offline_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DataFileError, match="Anthropic/hh-rlhf: cannot fetch.*--data.path"):
        load("Anthropic/hh-rlhf")


def test_subset_and_splits_are_identical_across_methods(tmp_path):
    path = head_lines(PKU, 400, tmp_path / "pku.jsonl")
    a = load(path, max_pairs="100")
    cfg = Config.load(
        overrides={"data.path": str(path), "data.max_pairs": "100", "mars.strategy": "uniform", "mars.tau": "2"}
    )
    b = read_preferences(cfg.data, seed=cfg.seed)
    assert a.table.select(["pair_id", "split"]).to_pylist() == b.table.select(["pair_id", "split"]).to_pylist()
    assert a.report["selected"] == 100 and a.report["not_selected"] == a.report["kept"] - 100
    c = read_preferences(DataConfig(path=str(path), max_pairs=100), seed=1)
    assert set(c.table.column("pair_id").to_pylist()) != set(a.table.column("pair_id").to_pylist())
    # data.seed fixes the subset and splits whatever the run's seed (seeds of training on one subset).
    d = read_preferences(DataConfig(path=str(path), max_pairs=100, seed=0), seed=1)
    assert d.table.select(["pair_id", "split"]).to_pylist() == a.table.select(["pair_id", "split"]).to_pylist()


def test_builtin_demo_reads_clean():
    res = load("builtin:demo")
    assert_counts(res)
    assert res.report["quarantined"] == 0 and 200 <= res.report["kept"] <= 500
    assert set(res.table.column("subset").to_pylist()) == {"helpful", "harmless"}


def test_parquet_round_trip_keeps_schema(tmp_path):
    res = load("builtin:demo")
    pq.write_table(res.table, tmp_path / "x.parquet")
    assert pq.read_table(tmp_path / "x.parquet").schema.equals(PAIR_SCHEMA)
