"""`mars-ray train`: the T-epoch loop, every strategy, resume after a killed driver, worker faults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.core.west_of_n import best_worst, dialogue_messages, group_counts

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Metrics that depend on wall time, not on what was computed.
TIMING = {
    "augment_s",
    "train_s",
    "eval_s",
    "train_tokens_per_s",
    "val_tokens_per_s",
    "test_tokens_per_s",
    "step_time_s",
}


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,budget", [(1, 5), (7, 3), (7, 7), (5, 23), (4, 0)])
def test_group_counts_spend_the_budget_evenly(n, budget):
    c = group_counts(n, budget, np.random.default_rng(0))
    assert c.sum() == budget and c.max() - c.min() <= 1
    assert np.array_equal(c, group_counts(n, budget, np.random.default_rng(0)))  # seeded


def test_group_counts_rejects_impossible_budgets():
    with pytest.raises(ValueError, match="at least one prompt"):
        group_counts(0, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="budget"):
        group_counts(3, -1, np.random.default_rng(0))


def test_best_worst_picks_extremes_and_refuses_degenerate_groups():
    assert best_worst(["a", "b", "c"], [0.1, 0.9, -0.3]) == (1, 2)
    assert best_worst(["a", None, "c"], [0.1, float("nan"), 0.5]) == (2, 0)  # failed generations skipped
    assert best_worst(["same", "same"], [0.2, 0.1]) is None  # one distinct text
    assert best_worst(["a", "b"], [0.5, 0.5]) is None  # tied
    assert best_worst(["a", ""], [0.5, 0.1]) is None


def test_dialogue_messages_from_transcripts_and_plain_prompts():
    msgs = dialogue_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: boil an egg?\n\nAssistant:")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[-1]["content"] == "boil an egg?"
    assert dialogue_messages("How do I boil an egg?") == [{"role": "user", "content": "How do I boil an egg?"}]


@pytest.mark.parametrize(
    ("strategy", "warmup", "scale", "head", "warns", "mentions_scale"),
    [
        ("mars", 0, "std", False, True, True),
        ("mars-nosem", 0, "raw", False, True, False),
        ("adaboost", 0, "std", False, True, False),
        ("mars", 1, "std", False, False, False),
        ("uniform", 0, "std", False, False, False),
        ("mars", 0, "std", True, False, False),
    ],
)
def test_a_new_head_without_warmup_warns_that_epoch_one_allocates_by_noise(
    strategy, warmup, scale, head, warns, mentions_scale
):
    from mars_ray.pipeline import _new_head_notes

    cfg = Config.load(
        overrides={"mars.strategy": strategy, "mars.warmup_passes": str(warmup), "mars.margin_scale": scale}
    )
    notes = _new_head_notes(cfg, head)
    assert (notes == []) == head
    warning = [n for n in notes if "warning" in n]
    assert bool(warning) == warns
    if warns:
        assert strategy in warning[0] and "mars.warmup_passes 1" in warning[0]
        assert ("margin_scale std" in warning[0]) == mentions_scale


# --------------------------------------------------------------------------------------------
# The loop on local Ray with tiny models
# --------------------------------------------------------------------------------------------


def loop_cfg(tmp_path, bert, llama, out: str, **over) -> Config:
    from test_augment import tiny_cfg

    base = {
        "output.dir": str(tmp_path / out),
        "mars.epochs": "2",
        "mars.budget": "12",
        "mars.west_of_n": "3",
        "data.max_pairs": "30",
        "data.val_fraction": "0.2",
        "data.test_fraction": "0.2",
        "data.split_by": "pair",
        "train.batch_size": "4",
        "train.lr": "1e-3",
        "train.passes": "1",
        "train.lora_r": "4",
        "train.lora_alpha": "8",
        "paraphrase.topup_rounds": "0",
    }
    base.update(over)
    return tiny_cfg(tmp_path, bert, llama, **base)


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


STRATEGIES = ["none", "uniform", "mars", "mars-nosem", "west-of-n", "adaboost"]


def _check_self_describing(run_dir: Path, strategy: str, model, train_pairs) -> None:
    """model/ carries its card, its config and its training pairs' reward statistics, read with
    plain transformers; serve normalises with those statistics."""
    from transformers import AutoTokenizer

    from mars_ray.config import ServeConfig
    from mars_ray.models.reward import score_pairs
    from mars_ray.serve import protocol as P

    mdir = run_dir / "model"
    card = (mdir / "README.md").read_text(encoding="utf-8")
    front = card.split("---")[1]
    assert "library_name: transformers" in front and all(
        f"- {t}" in front for t in ("reward-model", "mars", "mars-ray")
    )
    assert f"`{strategy}` strategy" in card and "## Held-out metrics" in card and "mars_ray_config.yaml" in card
    assert (mdir / "mars_ray_config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    cfg = model.config
    assert cfg.mars_ray_reward_stats["n_pairs"] == train_pairs.num_rows and cfg.std > 0
    t = train_pairs.to_pydict()
    tok = AutoTokenizer.from_pretrained(mdir)
    rc, rr = score_pairs(
        model.eval(),
        tok,
        t["prompt"],
        t["chosen"],
        t["rejected"],
        batch_size=16,
        max_prompt_tokens=512,
        max_response_tokens=192,
    )
    allr = np.concatenate([rc, rr])
    assert cfg.mean == pytest.approx(allr.mean(), abs=1e-4) and cfg.std == pytest.approx(allr.std(), abs=1e-4)
    norm = P.make_normalizer(ServeConfig(normalize=True), str(run_dir), str(mdir))
    assert (norm.mean, norm.std) == (cfg.mean, cfg.std) and "config.json" in norm.source


@pytest.mark.ray
def test_every_strategy_two_epochs(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    """2 epochs of each strategy, same data/seed/budget; what differs is what each adds. (Stages
    in-process: the Ray Data wiring is tested in test_augment and the resume test below.)"""
    from transformers import AutoModelForSequenceClassification

    from mars_ray.pipeline import read_metrics, run_mars

    runs = {}
    for strategy in STRATEGIES:
        cfg = loop_cfg(
            tmp_path,
            tiny_bert_dir,
            tiny_llama_dir,
            strategy,
            **{"mars.strategy": strategy, "train.num_workers": "0", "resources.in_process": "true"},
        )
        run_mars(cfg, log=lambda m: None)
        runs[strategy] = Path(cfg.output.dir)

    originals = {s: pq.read_table(d / "data" / "train.parquet") for s, d in runs.items()}
    ids = {s: sorted(t.column(S.PAIR_ID).to_pylist()) for s, t in originals.items()}
    assert all(v == ids["none"] for v in ids.values()), "every strategy must see the same training pairs"
    n0 = originals["none"].num_rows

    for strategy, d in runs.items():
        rows = read_metrics(d)
        assert [r["epoch"] for r in rows] == [1, 2]
        for r in rows:
            assert 0.0 <= r["val_accuracy"] <= 1.0 and "val_snr" in r and r["test_n"] > 0
        assert (d / "metrics.csv").read_text().splitlines()[0].startswith("epoch,strategy,train_pairs")
        m = AutoModelForSequenceClassification.from_pretrained(d / "model")  # plain HF folder
        assert m.config.num_labels == 1
        _check_self_describing(d, strategy, m, originals[strategy])
        t1, t2 = (pq.read_table(d / "epochs" / f"00{e}" / "train.parquet") for e in (1, 2))
        syn = [pq.read_table(d / "epochs" / f"00{e}" / "synthetic.parquet") for e in (1, 2)]
        # D^t = D^{t-1} ∪ D_syn, originals never dropped
        assert t1.num_rows == n0 + syn[0].num_rows and t2.num_rows == t1.num_rows + syn[1].num_rows
        assert set(ids["none"]) <= set(t2.column(S.PAIR_ID).to_pylist())
        orig_ids = set(ids["none"])
        for e, s in enumerate(syn, 1):
            assert set(s.column(S.SOURCE_PAIR_ID).to_pylist()) <= orig_ids  # lineage resolves
            assert set(s.column(S.EPOCH).to_pylist()) <= {e}
            assert s.num_rows <= 12
        if strategy in ("none", "adaboost"):
            assert syn[0].num_rows == syn[1].num_rows == 0
        else:
            assert syn[0].num_rows > 0
        ops = set(syn[0].column(S.OPERATION).to_pylist())
        summary = json.loads((d / "epochs" / "001" / "augment_summary.json").read_text())
        if strategy == "west-of-n":
            assert ops == {"west-of-3"} and summary["groups"].get("ok", 0) == syn[0].num_rows
            assert syn[0].num_rows + summary["budget_unspent"] == 12
        if strategy in ("uniform", "mars", "mars-nosem", "west-of-n"):  # every generated text accounted for
            for op, r in summary["audit"]["operations"].items():
                assert r["generated"] == r["kept"] + r["unused"] + r["generation_failed"] + sum(r["rejected"].values())
                assert r["generated"] > 0, op
            assert sum(r["kept"] for r in summary["audit"]["operations"].values()) > 0
            assert {e["operation"] for e in summary["audit"]["examples"]} == ops
        if strategy in ("uniform", "mars", "mars-nosem"):
            assert all(op.startswith(("paraphrase", "rewrite")) for op in ops)
        if strategy == "mars":
            assert "semantic" in summary
        if strategy == "mars-nosem":
            assert "semantic" not in summary
        if strategy == "adaboost":
            w = t2.column("loss_weight").to_numpy()
            assert np.isclose(w.mean(), 1.0) and w.std() > 0  # margins of r^1 differ, so do weights
            assert "loss_weight" not in pq.read_table(d / "epochs" / "002" / "synthetic.parquet").column_names
    # the strategies do train different models
    acc = {s: [r["val_loss"] for r in read_metrics(d)] for s, d in runs.items()}
    assert len({tuple(round(x, 6) for x in v) for v in acc.values()}) > 1


@pytest.mark.ray
def test_warmup_r0_is_built_once_and_shared_by_every_strategy_of_a_seed(
    ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir
):
    """mars.warmup_passes: r^0 is the backbone trained on the human pairs, built by the first run and
    taken from model.cache_dir by the next strategy of the same seed; another seed builds its own.
    Its margins are informative (a fresh score head's are not), and margin_scale std uses them."""
    from mars_ray.pipeline import WARMUP_FILE, run_mars

    over = {"train.num_workers": "0", "resources.in_process": "true", "mars.epochs": "1", "mars.warmup_passes": "2"}
    infos, margins = {}, {}
    for name, strategy, seed in (("a", "mars-nosem", "0"), ("b", "uniform", "0"), ("c", "mars-nosem", "1")):
        cfg = loop_cfg(
            tmp_path,
            tiny_bert_dir,
            tiny_llama_dir,
            name,
            **over,
            **{"mars.strategy": strategy, "seed": seed, "mars.margin_scale": "std"},
        )
        summary = run_mars(cfg, log=lambda m: None)
        infos[name] = json.loads((Path(cfg.output.dir) / WARMUP_FILE).read_text())
        assert summary["warmup"]["model_dir"] == infos[name]["model_dir"]
        alloc = pq.read_table(Path(cfg.output.dir) / "epochs" / "001" / "allocation.parquet")
        if "margin" in alloc.column_names:
            margins[name] = alloc.column("margin").to_numpy()
        diag = json.loads((Path(cfg.output.dir) / "epochs" / "001" / "augment_summary.json").read_text())["diagnostics"]
        if strategy == "uniform":
            assert diag["ess_ratio"] == pytest.approx(1.0)
        else:
            assert diag["ess_ratio"] < 0.99 and diag["margin_std"] > 0
    assert infos["a"]["built_by_this_run"] and not infos["b"]["built_by_this_run"]
    assert infos["a"]["key"] == infos["b"]["key"] != infos["c"]["key"] and infos["c"]["built_by_this_run"]
    assert infos["a"]["passes"] == 2 and infos["a"]["val_accuracy"] is not None
    # the warm model's margins are far from a fresh head's (std ~0.01 on tiny models too)
    fresh = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "fresh", **{"train.num_workers": "0"})
    from mars_ray.stages.score import score_margins_local

    train = pq.read_table(Path(tmp_path / "a") / "data" / "train.parquet")
    m0 = score_margins_local(train, model_ref=fresh.model.reward, cfg=fresh).column("margin").to_numpy()
    assert margins["a"].std() > 3 * m0.std()


@pytest.mark.ray
def test_finished_run_drops_its_checkpoints_unless_asked_and_still_resumes(
    ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir
):
    """A finished run's ray_train/ checkpoints (model, optimizer: the bulk of a run directory) are
    deleted once model/ is written; a resume of the finished run then rebuilds from model/ and ends
    with the same metrics; output.keep_checkpoints keeps them."""
    from mars_ray.pipeline import read_metrics, run_mars

    over = {"mars.strategy": "uniform", "mars.epochs": "2", "train.num_workers": "0", "resources.in_process": "true"}
    cfg = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "drop", **over)
    run = Path(cfg.output.dir)
    summary = run_mars(cfg, log=lambda m: None)
    assert summary["checkpoints"].startswith("deleted") and summary["checkpoints"] != "deleted (0 MiB)"
    assert (run / "ray_train").is_dir() and not list((run / "ray_train").glob("*/checkpoint_*"))
    before = (read_metrics(run), (run / "model" / "model.safetensors").read_bytes())
    again = run_mars(cfg, resume=True, log=lambda m: None)
    assert (read_metrics(run), (run / "model" / "model.safetensors").read_bytes()) == before
    assert again["final"] == summary["final"]

    keep = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "keep", **over, **{"output.keep_checkpoints": "true"})
    assert run_mars(keep, log=lambda m: None)["checkpoints"] == "kept"
    kept = list((Path(keep.output.dir) / "ray_train").glob("*/checkpoint_*"))
    assert {p.parent.name for p in kept} >= {"epoch_001", "epoch_002"}


@pytest.mark.ray
def test_run_dir_in_use_is_refused(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    from mars_ray.pipeline import RunDirError, run_mars

    cfg = loop_cfg(
        tmp_path,
        tiny_bert_dir,
        tiny_llama_dir,
        "used",
        **{"mars.strategy": "none", "mars.epochs": "1", "train.num_workers": "0"},
    )
    Path(cfg.output.dir).mkdir(parents=True)
    (Path(cfg.output.dir) / "something").write_text("x")
    with pytest.raises(RunDirError, match="--resume"):
        run_mars(cfg, log=lambda m: None)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_embedded_default_end_to_end(ray_local, tmp_path, capsys):
    """`mars-ray train` with only an output directory: MARS on builtin:demo with builtin:minilm and
    builtin:smollm2, on local Ray (the README's main command). The model learns, the allocation
    is not uniform, and the run ends with a summary of at most 10 lines."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.cli import main
    from mars_ray.pipeline import read_metrics

    out = tmp_path / "demo"
    capsys.readouterr()
    assert main(["train", "--output.dir", str(out)]) == 0
    printed = capsys.readouterr().out
    tail = printed[printed.rindex("done in ") :].strip().splitlines()
    assert len(tail) <= 10 and f"mars-ray serve --model {out}" in tail[-1], tail
    assert any(line.strip().startswith("test accuracy") and "->" in line for line in tail), tail
    rows = read_metrics(out)
    cfg = Config.load(out / "config.yaml")
    summary = json.loads((out / "summary.json").read_text())
    # it learns: the base model's fresh head is a coin flip, the final model is not
    assert summary["base"]["test_accuracy"] < 0.7 and rows[-1]["test_accuracy"] >= 0.8, (summary["base"], rows[-1])
    assert rows[-1]["train_loss"] < 0.45
    for t in range(1, cfg.mars.epochs + 1):
        d = json.loads((out / "epochs" / f"{t:03d}" / "augment_summary.json").read_text())["diagnostics"]
        assert d["ess_ratio"] < 0.9 and d["q_share_lowest_decile"] > 0.15, (t, d)
    cfg = Config.load(out / "config.yaml")
    assert cfg.mars.strategy == "mars" and cfg.model.reward == "builtin:minilm"
    assert [r["epoch"] for r in rows] == list(range(1, cfg.mars.epochs + 1))
    for r in rows:
        assert r["synthetic"] + r["budget_unspent"] == cfg.mars.budget
        assert r["synthetic"] > 0 and 0 <= r["val_accuracy"] <= 1
    # the final model is a plain HF folder that scores pairs without mars_ray
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    enc = tok(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 1)
    s = json.loads((out / "epochs" / "001" / "augment_summary.json").read_text())
    # the built-in rewriter fails the quality figure: the embedded default paraphrases only, and says so
    assert "builtin:smollm2" in s["semantic"]["off"] and "refine" not in s
    assert s["paraphrase"]["requested"] >= 1
    assert "## Synthetic data audit" in (out / "report.md").read_text()


@pytest.mark.ray
def test_synthetic_weight_and_passes_per_epoch(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    """train.synthetic_weight: synthetic pairs enter the loss at that weight relative to human ones
    (the epoch's train.parquet holds the weights; metrics, summary and model card record it);
    train.passes_per_epoch: each epoch's training run takes its own number of passes."""
    from mars_ray.pipeline import LOSS_WEIGHT, end_summary, read_metrics, run_mars

    over = {
        "mars.strategy": "uniform",
        "mars.epochs": "2",
        "train.num_workers": "0",
        "resources.in_process": "true",
        "train.synthetic_weight": "0.25",
        "train.passes_per_epoch": "[1, 2]",
    }
    cfg = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "sw", **over)
    summary = run_mars(cfg, log=lambda m: None)
    run = Path(cfg.output.dir)
    rows = read_metrics(run)
    for t, row in enumerate(rows, start=1):
        table = pq.read_table(run / "epochs" / f"{t:03d}" / "train.parquet")
        w = table.column(LOSS_WEIGHT).to_numpy()
        synthetic = np.array([o == "synthetic" for o in table.column("origin").to_pylist()])
        assert synthetic.any() and (~synthetic).any()
        assert set(w[synthetic]) == {0.25} and set(w[~synthetic]) == {1.0}
        assert row["synthetic_weight"] == 0.25 and row["passes"] == t
        assert row["synthetic_share"] == pytest.approx(synthetic.mean())
        # steps: passes x ceil(pairs / batch) (one worker, no accumulation)
        assert row["steps"] == t * -(-row["train_pairs"] // cfg.train.batch_size)
    assert "synthetic loss weight 0.25" in end_summary(summary)[0]
    assert "loss weight 0.25 relative to human pairs" in (run / "model" / "README.md").read_text()
    # the same seed's warm-up (none here) and r0 do not depend on either setting
    from mars_ray.pipeline import warmup_key

    plain = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "plain", **{"mars.strategy": "uniform"})
    assert warmup_key(cfg, ["a", "b"]) == warmup_key(plain.copy({"train.num_workers": 0}), ["a", "b"])


def test_synthetic_weight_and_passes_per_epoch_are_checked():
    from mars_ray.config import Config

    with pytest.raises(ValueError, match="synthetic_weight=0.0 must be > 0"):
        Config.load(overrides={"train.synthetic_weight": "0"})
    with pytest.raises(ValueError, match=r"passes_per_epoch=\[6\] needs one number >= 1 per MARS epoch"):
        Config.load(overrides={"mars.epochs": "2", "train.passes_per_epoch": "[6]"})
    cfg = Config.load(overrides={"mars.epochs": "2", "train.passes_per_epoch": "[6, 11]"})
    copy = cfg.copy({"train.passes": 3})
    copy.train.passes_per_epoch.append(1)  # an independent copy: lists are not shared
    assert cfg.train.passes_per_epoch == [6, 11] and cfg.train.passes == 1 and copy.train.passes == 3
