"""Self-describing models: reward statistics in config.json, the model card, `mars-ray push` (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mars_ray import model_card as MC
from mars_ray.config import ServeConfig
from mars_ray.serve import protocol as P


def _folder(tmp_path, **extra):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "num_labels": 1, **extra}))
    return d


def test_statistics_round_trip_and_serve_prefers_them(tmp_path):
    d = _folder(tmp_path)
    stats = MC.reward_statistics([1.0, 2.0, 3.0], [0.0, -1.0, 1.0])
    r = np.array([1.0, 2.0, 3.0, 0.0, -1.0, 1.0])
    assert stats == {"mean": pytest.approx(r.mean()), "std": pytest.approx(r.std()), "n_pairs": 3}
    MC.store_reward_statistics(d, stats, "test")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["mean"] == stats["mean"] and cfg["std"] == stats["std"]
    assert MC.read_reward_statistics(d) == (stats["mean"], stats["std"])
    norm = P.make_normalizer(ServeConfig(normalize=True), None, str(d))  # a bare folder, no run dir
    assert (norm.mean, norm.std) == (stats["mean"], stats["std"]) and "config.json" in norm.source
    explicit = P.make_normalizer(ServeConfig(normalize=True, norm_mean=5.0, norm_std=2.0), None, str(d))
    assert (explicit.mean, explicit.std) == (5.0, 2.0)
    assert not P.make_normalizer(ServeConfig(), None, str(d)).enabled
    # a folder without statistics and no run: the clear error as before
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert MC.read_reward_statistics(bare) is None
    with pytest.raises(ValueError, match="no recorded reward statistics"):
        P.make_normalizer(ServeConfig(normalize=True), None, str(bare))
    with pytest.raises(ValueError, match="finite"):
        MC.reward_statistics([float("nan")], [0.0])


def test_card_front_matter_and_body():
    text = MC.render_card(
        base_model="builtin:minilm",
        strategy="mars",
        epochs=2,
        budget=500,
        data_files=["/data/hh_train.jsonl"],
        data_report={"read": 125, "kept": 125, "quarantined": 0, "splits": {"train": 100, "val": 12, "test": 13}},
        operations={"paraphrase:rejected": 600, "rewrite": 100, "paraphrase:both": 300},
        human_pairs=100,
        final={"test_accuracy": 0.7, "val_accuracy": 0.65, "val_n": 12},
        base={"test_accuracy": 0.5},
        stats={"mean": 0.1, "std": 1.5, "n_pairs": 100},
        config_hash="abc123",
        chat_template=False,
    )
    front, body = text.split("---")[1], text.split("---", 2)[2]
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in front
    assert "- reward-model\n- mars\n- mars-ray" in front
    assert "| human | 100 | 9.1% |" in body and "| synthetic: paraphrase:rejected | 600 | 54.5% |" in body
    assert "| accuracy | 0.500 | 0.700 |" in body and "`/data/hh_train.jsonl`" in body
    assert (
        "mean 0.1000, std 1.5000" in body
        and "abc123" in body
        and "mars-ray train --config mars_ray_config.yaml" in body
    )


def test_push_says_plainly_when_the_hub_is_unreachable(tmp_path, monkeypatch, capsys):
    from mars_ray.cli import main

    d = _folder(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["push", "--model", str(d), "--repo", "org/name"]) == 1
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "nothing was uploaded" in err and "http://127.0.0.1:9" in err
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MC.push(tmp_path, "org/name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        MC.push(d, "org/name")
