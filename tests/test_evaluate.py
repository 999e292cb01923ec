"""`mars-ray eval` on tiny config-built models (no Ray needed), and the final-feature extraction
the curvature diagnostic uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from mars_ray.cli import main
from mars_ray.core.metrics import rewardbench_sections
from mars_ray.models.reward import encode_pairs, load_reward_model, score_pairs, score_with_features


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_final_features_reproduce_the_reward(which, tiny_bert_rm_dir, tiny_llama_rm_dir):
    model, tok = load_reward_model(
        str(tiny_bert_rm_dir if which == "bert" else tiny_llama_rm_dir), seed=3, dtype="float32"
    )
    model.eval()
    enc = encode_pairs(
        tok,
        ["Hi there.", "A much longer prompt about cooking rice well"],
        ["Hello!", "Rinse it, then boil."],
        max_prompt_tokens=64,
        max_response_tokens=32,
    )
    rewards, phi = score_with_features(model, tok, enc, batch_size=1)
    head = [m for m in model.modules() if isinstance(m, __import__("torch").nn.Linear) and m.out_features == 1][-1]
    w = head.weight.detach().numpy()[0]
    b = float(head.bias.detach()) if head.bias is not None else 0.0
    assert phi.shape == (2, head.in_features)
    np.testing.assert_allclose(phi @ w + b, rewards, rtol=1e-4, atol=1e-5)
    # Batched (padded) and one at a time agree: the decoder reads the last real token.
    r2, phi2 = score_with_features(model, tok, enc, batch_size=2)
    np.testing.assert_allclose(r2, rewards, atol=1e-5)
    np.testing.assert_allclose(phi2, phi, atol=1e-5)


# RewardBench's documented per-subset example counts and section membership (its constants.py):
# the weights of its section scores. math-prm counts 984 (it has 447 rows), as much as the six
# hep-* subsets together.
_RB_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "refusals-dangerous": 100, "refusals-offensive": 100,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136, "math-prm": 984,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}  # fmt: skip
_RB_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}  # fmt: skip


def _rewardbench_formula(accuracies: dict) -> dict:
    """Section score = example-count-weighted mean of the section's subsets present."""
    out = {}
    for section, subs in _RB_SECTIONS.items():
        present = [s for s in subs if s in accuracies]
        if present:
            out[section] = sum(accuracies[s] * _RB_COUNTS[s] for s in present) / sum(_RB_COUNTS[s] for s in present)
    return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_command_writes_metrics_sections_and_curvature(tmp_path, tiny_bert_rm_dir):
    rng = np.random.default_rng(0)
    subsets = ["llmbar-natural"] * 6 + ["mt-bench-easy"] * 4 + ["math-prm"] * 3 + ["hep-go"] * 3 + ["donotanswer"] * 4
    rows = [
        {
            "prompt": f"Question {i}: how do I do task {rng.integers(1000)}?",
            "chosen": f"Careful answer number {i} " * (1 + i % 5),
            "rejected": f"Bad reply {i}",
            "subset": s,
        }
        for i, s in enumerate(subsets)
    ]
    rows.append({"prompt": "broken row", "chosen": "", "rejected": "x", "subset": "hep-go"})  # quarantined, not lost
    data = _write(tmp_path / "bench.jsonl", rows)
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_bert_rm_dir),
            "--data.path",
            str(data),
            "--output.dir",
            str(out),
            "--eval.curvature_bins",
            "4",
            "--model.dtype",
            "float32",
        ]
    )
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["n"] == 20 and res["quarantined"] == 1
    # The same numbers straight from the model.
    model, tok = load_reward_model(str(tiny_bert_rm_dir), seed=0, dtype="float32")
    model.eval()
    good = rows[:20]
    rc_, rr_ = score_pairs(
        model,
        tok,
        [r["prompt"] for r in good],
        [r["chosen"] for r in good],
        [r["rejected"] for r in good],
        batch_size=4,
        max_prompt_tokens=512,
        max_response_tokens=192,
    )
    d = rc_ - rr_
    assert res["accuracy"] == pytest.approx(float(np.mean(d > 0)))
    assert res["snr"] == pytest.approx(float(d.mean() / d.std()), rel=1e-4)
    for s in set(subsets):
        mask = np.array([x == s for x in subsets])
        assert res["subsets"][s]["n"] == int(mask.sum())
        assert res["subsets"][s]["accuracy"] == pytest.approx(float(np.mean(d[mask] > 0)))
    assert res["sections"] == pytest.approx(rewardbench_sections(res["subsets"])["sections"])
    assert set(res["sections_covered"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert sum(b["n"] for b in res["curvature"]) == 20 and len(res["curvature"]) == 4
    assert sum(b["n"] for b in res["by_length"]) == 20
    for f in ("eval.md", "eval.html", "margins.png", "curvature.png", "sections.png", "scores.npz"):
        assert (out / f).stat().st_size > 0, f
    assert "data:image/png;base64," in (out / "eval.html").read_text()
    # RewardBench's own results file, and its section formula applied to it gives our sections
    rb = json.loads((out / "rewardbench_results.json").read_text())
    assert (rb["model"], rb["model_type"], rb["chat_template"]) == (str(tiny_bert_rm_dir), "Seq. Classifier", None)
    accs = {k: v for k, v in rb.items() if k not in ("model", "model_type", "chat_template")}
    assert accs == {s: res["subsets"][s]["accuracy"] for s in res["subsets"]}
    assert _rewardbench_formula(accs) == pytest.approx(res["sections"])


def test_eval_reads_a_run_directory_and_needs_a_model(tmp_path, tiny_bert_rm_dir, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_bert_rm_dir, run / "model")
    data = _write(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    )
    assert main(["eval", "--model", str(run), "--data.path", str(data), "--output.dir", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["model_path"] == str(run / "model") and res["sections"] == {} and res["n"] == 5
    assert main(["eval", "--data.path", str(data), "--output.dir", str(tmp_path / "e2")]) == 2
    assert "--model" in capsys.readouterr().err


def test_eval_leaves_out_the_pairs_a_run_was_trained_on(tmp_path, tiny_bert_rm_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mars_ray.core.schema import pair_id

    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    data = _write(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    used = [pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:4]] + ["0" * 16]  # + one not in the file
    pq.write_table(pa.table({"pair_id": used}), run / "data" / "pairs.parquet")
    out = tmp_path / "e"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_bert_rm_dir),
                "--data.path",
                str(data),
                "--output.dir",
                str(out),
                "--eval.exclude_pairs",
                str(run),
            ]
        )
        == 0
    )
    res = json.loads((out / "eval.json").read_text())
    assert res["n"] == 6 and res["excluded"] == 4 and res["excluded_from"] == str(run)
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_bert_rm_dir),
                "--data.path",
                str(data),
                "--output.dir",
                str(out),
                "--eval.exclude_pairs",
                str(tmp_path / "nope"),
            ]
        )
        == 1
    )
    assert "exclude_pairs" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_minilm_on_llmbar_chat_hard(tmp_path):
    path = SHARED_DATA / "llmbar_rewardbench_chat_hard_419.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data not beside the project)")
    from tiny_models import tiny_reward_model

    from mars_ray.models import minilm_path

    # MiniLM with a seeded reward head, saved as a reward model (eval refuses a bare backbone)
    rm = tiny_reward_model(Path(minilm_path()), tmp_path / "minilm_rm")
    out = tmp_path / "eval"
    # Sized down for the suite's time: 140 of the 419 pairs (data.max_pairs draws them at random;
    # every subset is still present).
    args = ["--data.path", str(path), "--data.max_pairs", "140", "--output.dir", str(out)]
    assert main(["eval", "--model", str(rm), *args]) == 0
    res = json.loads((out / "eval.json").read_text())
    # LLMBar is five of Chat Hard's six subsets (mt-bench-hard is not in it).
    assert res["n"] == 140 and res["sections_covered"] == ["Chat Hard"] and not res["sections_complete"]["Chat Hard"]
    assert set(res["subsets"]) == {
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    }
    # RewardBench's weighting: each subset by its fixed example count, whatever share of it is here
    assert res["sections"] == pytest.approx(_rewardbench_formula({k: v["accuracy"] for k, v in res["subsets"].items()}))


def test_heldout_config_reads_the_other_file_as_itself():
    from mars_ray.config import Config
    from mars_ray.experiments import heldout_config

    cfg = Config.load(
        overrides={
            "data.path": "/x/hh.jsonl",
            "data.format": "hh-rlhf",
            "data.max_pairs": "250",
            "data.columns": "{prompt: q, chosen: a, rejected: b}",
            "data.val_fraction": "0.2",
            "data.max_prompt_tokens": "300",
            "seed": "3",
        }
    )
    e = heldout_config(cfg, "/y/llmbar.jsonl", 1000)
    assert (e.data.path, e.data.format, e.data.columns, e.data.max_pairs) == ("/y/llmbar.jsonl", "auto", {}, 1000)
    assert e.data.max_prompt_tokens == 300 and e.data.seed == 0 and e.seed == 3
    assert heldout_config(cfg, "/y/z.jsonl", None).data.max_pairs is None


def test_eval_scores_a_rewardbench2_file_the_way_rewardbench2_does(tmp_path, tiny_bert_rm_dir):
    """Best-of-4 rows (one chosen, three rejected) and a Ties subset (ref/tied prompts with
    several correct answers): per-subset scores from the completions' own rewards, RewardBench 2's
    results file, and bad rows quarantined, not lost."""
    rows = []
    for i in range(6):
        for subset in ("Factuality", "Focus"):
            rows.append(
                {
                    "id": f"{subset}-{i}",
                    "subset": subset,
                    "prompt": f"Question {i} about {subset.lower()}?",
                    "chosen": [f"A careful, correct answer number {i} " * (1 + i % 3)],
                    "rejected": [f"wrong {i}", f"Another reply {i} " * 2, f"nope {i}"],
                    "num_correct": 1,
                    "total_completions": 4,
                }
            )
    for p in range(4):
        rows.append(
            {
                "id": f"ref:{p}",
                "subset": "Ties",
                "prompt": f"Name a prime below {10 + p}.",
                "chosen": ["7"],
                "rejected": ["8", "9"],
                "num_correct": 1,
                "total_completions": 3,
            }
        )
        rows.append({"id": f"tied:{p}", "subset": "Ties", "prompt": f"Name any prime below {10 + p}.",
                     "chosen": ["2", "3", "5"], "rejected": ["4", "6 is prime"], "num_correct": 3, "total_completions": 5})  # fmt: skip
    rows.append(
        {"id": "bad-1", "subset": "Focus", "prompt": "q", "chosen": ["ok"], "rejected": ["", "x"], "num_correct": 1}
    )
    rows.append(
        {"id": "bad-2", "subset": "Focus", "prompt": "q", "chosen": ["ok"], "rejected": ["x"], "num_correct": 2}
    )
    data = _write(tmp_path / "rb2.jsonl", rows)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_bert_rm_dir), "--data.path", str(data), "--output.dir", str(out),
                 "--model.dtype", "float32"]) == 0  # fmt: skip
    res = json.loads((out / "eval.json").read_text())
    assert res["format"] == "rewardbench2" and res["rows_read"] == len(rows) == res["n"] + res["quarantined"]
    assert res["quarantined"] == 2
    bad = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {(b["line"], b["field"]) for b in bad} == {(len(rows) - 1, "rejected[0]"), (len(rows), "num_correct")}
    # every completion's reward, straight from the model
    model, tok = load_reward_model(str(tiny_bert_rm_dir), seed=0, dtype="float32")
    model.eval()
    scored = {json.loads(x)["id"]: json.loads(x) for x in (out / "best_of_n_scores.jsonl").read_text().splitlines()}
    good = rows[:-2]
    for r in good:
        comps = r["chosen"] + r["rejected"]
        direct = score_pairs(model, tok, [r["prompt"]] * len(comps), comps, comps, batch_size=8,
                             max_prompt_tokens=512, max_response_tokens=192)[0]  # fmt: skip
        np.testing.assert_allclose(scored[r["id"]]["scores"], direct, atol=1e-4)
    # the best-of-4 subsets: chosen strictly on top, 1/k for a k-way tie at the top
    for subset in ("Factuality", "Focus"):
        res_rows = [scored[r["id"]]["scores"] for r in good if r["subset"] == subset]
        expect = np.mean([(1 / sum(s == max(x) for s in x)) if x[0] == max(x) else 0.0 for x in res_rows])
        assert res["subsets"][subset]["score"] == pytest.approx(expect) and res["subsets"][subset]["n"] == 6
    ties = res["subsets"]["Ties"]
    from mars_ray.core.metrics import ties_score

    tie_rows = [(r["id"], r["num_correct"], scored[r["id"]]["scores"]) for r in good if r["subset"] == "Ties"]
    assert ties["n"] == 8 and ties["prompts"] == 4 and ties["score"] == pytest.approx(ties_score(tie_rows)["score"])
    assert -0.01 <= ties["score"] <= 1.01
    assert res["rewardbench2_average"] == pytest.approx(np.mean([v["score"] for v in res["subsets"].values()]))
    rb = json.loads((out / "rewardbench_results.json").read_text())
    assert rb["model_type"] == "Seq. Classifier" and rb["Ties"] == pytest.approx(ties["score"])
    assert rb["Focus"] == pytest.approx(res["subsets"]["Focus"]["score"])
    # a training run refuses such rows with the reason
    from mars_ray.config import Config
    from mars_ray.data import DataFileError, read_preferences

    with pytest.raises(DataFileError, match="RewardBench 2 best-of-N row"):
        read_preferences(Config.load(overrides={"data.path": str(data)}).data, seed=0)
