"""The generation bank: outputs keyed so that every epoch, strategy, seed and trial shares them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_augment import tiny_cfg

from mars_ray.config import Config
from mars_ray.data import read_preferences

# A gate every candidate passes: what is compared is which generations happen, not their quality.
OPEN_GATE = {
    "paraphrase.min_semantic_similarity": "0",
    "paraphrase.min_length_ratio": "0.001",
    "paraphrase.max_length_ratio": "1000",
    "paraphrase.max_copy_similarity": "1",
    "paraphrase.topup_rounds": "0",
    "data.seed": "0",  # one training subset for every run seed (the paper's setting)
}


def _pairs(n=16):
    cfg = Config.load(overrides={"data.max_pairs": str(n), "data.val_fraction": "0", "data.test_fraction": "0"})
    return read_preferences(cfg.data, seed=0).table


def test_bank_counts_and_default_size():
    from mars_ray.bank import bank_counts, paraphrases_per_text

    gen = {"paraphrase_requested": 10, "paraphrase_hits": 7, "paraphrase_generated": 3, "paraphrase_failed": 0}
    gen |= {"rewrite_requested": 4, "rewrite_hits": 0, "rewrite_generated": 3, "rewrite_failed": 1}
    assert bank_counts(gen) == {"requested": 14, "hits": 7, "misses": 7, "generated": 6, "failed": 1, "corrupt": 0}
    cfg = Config.load(overrides={"mars.budget": "500"})
    assert paraphrases_per_text(cfg, 100) == 4  # B = 5N: uniform gives each pair 5, at most 3 per side
    cfg.bank.paraphrases = 7
    assert paraphrases_per_text(cfg, 100) == 7


@pytest.mark.ray
def test_another_run_seed_makes_no_new_generations(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    """Deterministic decoding never keys on the run seed (it used to: every seed regenerated the
    same texts), and sampled candidates key on their index: seed 1 after seed 0 generates nothing."""
    from mars_ray.augment import run_epoch

    pairs = _pairs()
    # one unit per pair; the stages in this process (sized down: the keys do not depend on Ray Data)
    over = {**OPEN_GATE, "mars.strategy": "uniform", "mars.budget": str(pairs.num_rows), "resources.in_process": "true"}
    for temperature in ("0", "1.0"):
        cache = str(tmp_path / f"cache-{temperature}")
        runs = []
        for seed in ("0", "1"):
            cfg = tiny_cfg(
                tmp_path,
                tiny_bert_dir,
                tiny_llama_dir,
                **{**over, "seed": seed, "paraphrase.temperature": temperature, "model.cache_dir": cache},
            )
            runs.append(run_epoch(cfg, pairs, reward_ref=cfg.model.reward, epoch=1, log=lambda m: None).summary)
        assert runs[0]["bank"]["generated"] > 0, temperature
        assert runs[1]["bank"]["generated"] == 0 and runs[1]["bank"]["misses"] == 0, (temperature, runs[1]["bank"])


@pytest.mark.ray
def test_a_built_bank_serves_every_strategy_and_seed(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    """`bank build` once; then uniform and mars-nosem at another seed each, two epochs' worth of
    demand, generate nothing; mars generates nothing for its rewrites (the label check happens at
    use). Sized down: 3 runs after the build (was 5: both strategies at both seeds), and the
    second build in this process."""
    from mars_ray.augment import run_epoch
    from mars_ray.bank import build_bank, inspect_bank

    pairs = _pairs()
    base = {**OPEN_GATE, "mars.budget": str(2 * pairs.num_rows), "mars.tau": "2.0", "bank.paraphrases": "6"}
    cfg = tiny_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, **base)
    manifest = build_bank(cfg, pairs, log=lambda m: None)
    texts = len(set(pairs.column("chosen").to_pylist()) | set(pairs.column("rejected").to_pylist()))
    assert manifest["texts"] == texts and manifest["paraphrase"]["texts_full"] == texts
    assert manifest["paraphrase"]["generated"] > 0 and manifest["rewrite"]["pairs"] > 0
    info = inspect_bank(cfg.model.cache_dir)
    assert info["entries"] >= manifest["paraphrase"]["generated"] and len(info["builds"]) == 1
    # a second build is all hits (in this process, sized down: the keys do not depend on Ray Data)
    local = tiny_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, **base, **{"resources.in_process": "true"})
    again = build_bank(local, pairs, log=lambda m: None)
    assert again["paraphrase"]["generated"] == 0 and again["rewrite"]["generated"] == 0

    outs = {}
    for strategy, seed in (("uniform", "0"), ("mars-nosem", "1"), ("mars", "0")):
        # the runs in this process (sized down); the build above is the Ray Data job
        c = tiny_cfg(
            tmp_path,
            tiny_bert_dir,
            tiny_llama_dir,
            **{**base, "mars.strategy": strategy, "seed": seed, "resources.in_process": "true"},
        )
        res = run_epoch(c, pairs, reward_ref=c.model.reward, epoch=1, log=lambda m: None)
        s = res.summary
        assert s["synthetic"] + s["budget_unspent"] == 2 * pairs.num_rows
        gen = s["generation"]
        assert gen["paraphrase_generated"] == 0 or strategy == "mars", (strategy, seed, gen)
        if strategy == "mars":
            assert gen.get("rewrite_generated", 0) == 0 and gen.get("rewrite_hits", 0) > 0
        outs[(strategy, seed)] = res
    assert np.isfinite(outs[("uniform", "0")].summary["diagnostics"]["ess_ratio"])


def test_bank_inspect_command(tmp_path, capsys):
    from mars_ray.cli import main
    from mars_ray.generation import GenerationCache

    cache = tmp_path / "cache"
    assert main(["bank", "inspect", "--model.cache_dir", str(cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 0  # nothing yet, and nothing created
    cache.mkdir()
    GenerationCache(cache / "generations.sqlite").put_many([("k1", "a"), ("k2", "b")], model="builtin:smollm2")
    (cache / "bank").mkdir()
    build = {"data": "d.jsonl", "pairs": 3, "texts": 6, "paraphrases_per_text": 2, "seconds": 1.0, "finished": "now"}
    (cache / "bank" / "b.json").write_text(json.dumps(build))
    assert main(["bank", "inspect", "--model.cache_dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "2 outputs" in out and "builtin:smollm2" in out and "d.jsonl (3 pairs, 6 responses x 2)" in out
