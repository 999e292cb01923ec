"""Reward-model training: losses, DeepSpeed config, the Ray Train loop (in-process, DDP, DeepSpeed)."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

# Ray Train V2 polls worker health every second by default; faster polls shorten every fit().
# (Set before the session's Ray starts so the controller inherits it.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

torch = pytest.importorskip("torch")

from mars_ray.config import Config, DeepSpeedConfig, TrainConfig  # noqa: E402
from mars_ray.core.losses import adaboost_weights, bt_loss, normalise_weights, pair_metrics  # noqa: E402
from mars_ray.train.deepspeed_config import build_ds_config  # noqa: E402

# --------------------------------------------------------------------------------------------
# Losses (pure)
# --------------------------------------------------------------------------------------------


def _nll(d: float) -> float:
    return math.log1p(math.exp(-d))


def test_bt_loss_matches_hand_computation():
    rc = torch.tensor([1.0, 0.0, -2.0])
    rr = torch.tensor([0.0, 0.5, 1.0])
    want = np.mean([_nll(1.0), _nll(-0.5), _nll(-3.0)])
    assert float(bt_loss(rc, rr)) == pytest.approx(want, rel=1e-6)
    # stable for huge margins
    assert float(bt_loss(torch.tensor([1000.0]), torch.tensor([0.0]))) == pytest.approx(0.0, abs=1e-6)
    assert float(bt_loss(torch.tensor([0.0]), torch.tensor([1000.0]))) == pytest.approx(1000.0, rel=1e-6)


def test_bt_loss_weights_and_margin():
    rc = torch.tensor([2.0, 0.0])
    rr = torch.tensor([0.0, 1.0])
    l0, l1 = _nll(2.0), _nll(-1.0)
    # weights: absolute multipliers, mean over the batch; weight on the wrong pair raises the loss
    assert float(bt_loss(rc, rr, weights=torch.tensor([0.5, 1.5]))) == pytest.approx(
        (0.5 * l0 + 1.5 * l1) / 2, rel=1e-6
    )
    assert float(bt_loss(rc, rr, weights=[2.0, 6.0])) == pytest.approx((2 * l0 + 6 * l1) / 2, rel=1e-6)
    assert float(bt_loss(rc, rr, weights=[0.5, 1.5])) > float(bt_loss(rc, rr))
    assert float(bt_loss(rc, rr, weights=[1.0, 1.0])) == pytest.approx(float(bt_loss(rc, rr)))
    # margin: subtracted inside the sigmoid, so a positive margin raises the loss
    m = torch.tensor([0.5, 0.25])
    assert float(bt_loss(rc, rr, margin=m)) == pytest.approx((_nll(1.5) + _nll(-1.25)) / 2, rel=1e-6)
    assert float(bt_loss(rc, rr, margin=1.0)) == pytest.approx((_nll(1.0) + _nll(-2.0)) / 2, rel=1e-6)
    assert float(bt_loss(rc, rr, margin=m)) > float(bt_loss(rc, rr))
    # gradients flow
    x = torch.tensor([0.3, -0.1], requires_grad=True)
    bt_loss(x, torch.zeros(2), weights=[1.0, 2.0]).backward()
    assert x.grad is not None and bool((x.grad < 0).all())
    assert float(bt_loss(rc, rr, weights=[0.0, 0.0])) == 0.0  # a batch of zero-weight pairs adds nothing
    with pytest.raises(ValueError):
        bt_loss(rc, rr, weights=[-1.0, 1.0])
    with pytest.raises(ValueError):
        bt_loss(rc, torch.zeros(3))


def test_a_pairs_weight_does_not_depend_on_its_batch():
    """AdaBoost weights act across the whole training set: the gradient a pair receives is the same
    whichever batch-mates it lands with (normalising by the batch's own weight sum, as before, made a
    heavy pair count less when its batch-mates were heavy too)."""
    w = normalise_weights(adaboost_weights(np.array([-2.0, 0.0, 0.0, 2.0]), beta=1.0))
    assert w.mean() == pytest.approx(1.0)

    def grad_of_pair0(mates):
        x = torch.zeros(1 + len(mates), requires_grad=True)
        bt_loss(x, torch.zeros(1 + len(mates)), weights=np.r_[w[0], w[mates]]).backward()
        return float(x.grad[0]) * (1 + len(mates))  # per-pair gradient times batch size

    assert grad_of_pair0([1]) == pytest.approx(grad_of_pair0([3]), rel=1e-6)  # light or heavy mates
    assert grad_of_pair0([1]) == pytest.approx(-0.5 * w[0], rel=1e-6)  # d/dx -log σ(x) at 0 is -1/2
    with pytest.raises(ValueError, match="sum to 0"):
        normalise_weights([0.0, 0.0])
    with pytest.raises(ValueError):
        normalise_weights([1.0, -1.0])


def test_adaboost_weights():
    d = np.array([-1.0, 0.0, 2.0])
    w = adaboost_weights(d, beta=0.5)
    raw = np.exp(-0.5 * d)
    np.testing.assert_allclose(w, raw / raw.mean())
    assert w.mean() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]  # mis-ranked pairs weigh most
    np.testing.assert_allclose(adaboost_weights(d, 0.0), np.ones(3))
    big = adaboost_weights(np.array([-1000.0, 1000.0]), 1.0)  # no overflow
    assert np.all(np.isfinite(big)) and big.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        adaboost_weights([], 1.0)
    with pytest.raises(ValueError):
        adaboost_weights([1.0, np.nan], 1.0)
    with pytest.raises(ValueError):
        adaboost_weights([1.0], -1.0)


def test_pair_metrics():
    m = pair_metrics(np.array([1.0, 2.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 1.0, 1.0]))
    d = np.array([1.0, 0.0, -1.0, 2.0])
    assert m["accuracy"] == 0.5  # the tie counts as wrong
    assert m["margin_mean"] == pytest.approx(d.mean())
    assert m["margin_std"] == pytest.approx(d.std())
    assert m["snr"] == pytest.approx(d.mean() / d.std())
    assert m["chosen_mean"] == pytest.approx(1.5) and m["rejected_mean"] == pytest.approx(1.0)
    assert m["n"] == 4
    assert pair_metrics([2.0, 2.0], [1.0, 1.0])["snr"] == math.inf
    assert pair_metrics([0.0, 0.0], [1.0, 1.0])["snr"] == -math.inf
    assert math.isnan(pair_metrics([1.0], [1.0])["snr"])
    assert math.isnan(pair_metrics([], [])["accuracy"])


def test_build_ds_config():
    t = TrainConfig(lr=1e-3, batch_size=4, grad_accum=2, weight_decay=0.01)
    c = build_ds_config(DeepSpeedConfig(stage=2), t, world_size=2)
    assert c["zero_optimization"]["stage"] == 2
    assert c["train_batch_size"] == 16 and c["train_micro_batch_size_per_gpu"] == 4
    assert c["gradient_accumulation_steps"] == 2 and c["gradient_clipping"] == 1.0
    assert c["optimizer"]["type"] == "AdamW"
    assert c["optimizer"]["params"] == {
        "lr": 1e-3,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "torch_adam": True,
    }
    assert c["bf16"]["enabled"] is False
    # overlap_comm (issue 39, defect 14): on for GPU workers by default, off on CPUs, or as set
    assert c["zero_optimization"]["overlap_comm"] is False
    assert build_ds_config(DeepSpeedConfig(stage=2), t, world_size=2, on_gpu=True)["zero_optimization"]["overlap_comm"]
    forced = build_ds_config(DeepSpeedConfig(stage=2, overlap_comm=False), t, world_size=2, on_gpu=True)
    assert forced["zero_optimization"]["overlap_comm"] is False
    c3 = build_ds_config(
        DeepSpeedConfig(stage=3, offload_params=True, offload_optimizer=True), t, world_size=1, bf16=True
    )
    assert c3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert c3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c3["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="stage=3"):
        build_ds_config(DeepSpeedConfig(stage=2, offload_params=True), t, world_size=1)
    with pytest.raises(ValueError, match="num_workers"):
        build_ds_config(DeepSpeedConfig(), t, world_size=0)
    with pytest.raises(ValueError, match="offload_optimizer"):
        build_ds_config(DeepSpeedConfig(stage=0, offload_optimizer=True), t, world_size=1)


# --------------------------------------------------------------------------------------------
# Model helpers + training loop
# --------------------------------------------------------------------------------------------

_GOOD = ["great", "excellent", "wonderful"]
_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "house",
    "tree",
    "river",
    "car",
    "book",
    "song",
    "blue",
    "red",
    "small",
    "large",
    "happy",
    "quiet",
    "window",
    "door",
]


def _pairs(n: int, seed: int):
    """Easy synthetic preferences: the chosen response contains a marker word, the rejected not."""
    from mars_ray.core.schema import human_row

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"question {i}: " + " ".join(rng.choices(_WORDS, k=6))
        base = rng.choices(_WORDS, k=5)
        chosen = " ".join(base[:2] + [rng.choice(_GOOD)] + base[2:])
        rejected = " ".join(base[:2] + [rng.choice(_WORDS)] + base[2:])
        rows.append(human_row(prompt=prompt, chosen=chosen, rejected=rejected))
    return rows


def _write(path: Path, rows, weight: float | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mars_ray.core.schema import PAIR_SCHEMA, WEIGHT

    if weight is not None:
        rows = [{**r, WEIGHT: weight} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    return _write(d / "train.parquet", _pairs(64, 1), weight=1.0), _write(d / "val.parquet", _pairs(32, 2))


def _cfg(**over) -> Config:
    # fp32 training and scoring: these tests check the loop's logic to 1e-5 (saved model equals the
    # loop's metrics, resume equals no resume); bf16 training is tests/test_precision.py's.
    base = {
        "seed": 0,
        "train.precision": "fp32",
        "model.dtype": "float32",
        "train.lr": 5e-2,  # tiny random BERT: a large lr learns the marker in 24 steps
        "train.batch_size": 8,
        "train.passes": 3,
        "train.lora": True,
        "train.lora_r": 8,
        "train.lora_alpha": 16,
        "train.lora_dropout": 0.0,
        "train.num_workers": 0,
        "data.max_prompt_tokens": 24,
        "data.max_response_tokens": 16,
    }
    base.update(over)
    return Config.load(overrides=base)


def _score(model, tok, path):
    import pyarrow.parquet as pq

    from mars_ray.models.reward import score_pairs

    t = pq.read_table(path).to_pydict()
    return score_pairs(
        model, tok, t["prompt"], t["chosen"], t["rejected"], batch_size=16, max_prompt_tokens=24, max_response_tokens=16
    )


def test_lora_merged_equals_unmerged_and_saved_dir_loads_plain(tiny_bert_dir, data_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.models.reward import load_reward_model
    from mars_ray.train.loop import _plain_model, lora_target_modules, wrap_lora

    model, tok = load_reward_model(
        str(tiny_bert_dir), seed=0, dtype="float32", new_head=True
    )  # merge exactness, not precision
    assert lora_target_modules(model) == ["query", "value"]
    peft_model = wrap_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial adapters (B starts at zero) and a changed head
        for _n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    peft_model.eval()
    rc, rr = _score(peft_model, tok, data_files[1])
    plain = _plain_model(peft_model)
    assert not hasattr(plain, "peft_config") or not plain.peft_config
    mc, mr = _score(plain, tok, data_files[1])
    np.testing.assert_allclose(mc, rc, atol=1e-5)
    np.testing.assert_allclose(mr, rr, atol=1e-5)
    plain.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    lc, lr = _score(loaded, AutoTokenizer.from_pretrained(tmp_path / "m"), data_files[1])
    np.testing.assert_allclose(lc, rc, atol=1e-5)
    np.testing.assert_allclose(lr, rr, atol=1e-5)
    # the peft model itself is untouched by the merged copy
    rc2, _ = _score(peft_model, tok, data_files[1])
    np.testing.assert_allclose(rc2, rc, atol=0)


def test_lora_on_llama_targets_q_v_and_merges(tiny_llama_dir):
    from mars_ray.models.reward import load_reward_model, score_texts
    from mars_ray.train.loop import _plain_model, lora_target_modules, wrap_lora

    model, tok = load_reward_model(str(tiny_llama_dir), seed=0, dtype="float32", new_head=True)
    assert lora_target_modules(model) == ["q_proj", "v_proj"]
    peft_model = wrap_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    peft_model.eval()
    kw = dict(batch_size=4, max_prompt_tokens=16, max_response_tokens=8)
    texts = (["hi there", "what is up"], ["fine thanks", "nothing much at all"])
    np.testing.assert_allclose(
        score_texts(_plain_model(peft_model), tok, *texts, **kw), score_texts(peft_model, tok, *texts, **kw), atol=1e-5
    )


def test_local_fit_learns_and_saves_plain_hf_folder(tiny_bert_dir, data_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.train import FitSpec, fit_reward_model

    train_path, val_path = data_files
    m = fit_reward_model(
        _cfg(),
        FitSpec(
            init_model=str(tiny_bert_dir),
            train_path=train_path,
            val_path=val_path,
            run_dir=tmp_path,
            name="local",
            weights_column="weight",
            test_path=val_path,  # the held-out pairs again: test_* must equal val_*
            test_before=True,
            score_path=train_path,
        ),
    )
    assert m["test_margin_mean"] == pytest.approx(m["val_margin_mean"], abs=1e-6) and m["test_n"] == m["val_n"]
    assert m["base_test_n"] == m["val_n"] and m["base_test_accuracy"] < m["test_accuracy"]
    # the trained model's rewards of the training pairs, in the checkpoint: the next epoch's margins
    scores = pq.read_table(m["scores_path"])
    assert Path(m["scores_path"]).parent == Path(m["checkpoint_dir"])
    assert scores.column("pair_id").to_pylist() == pq.read_table(train_path).column("pair_id").to_pylist()
    np.testing.assert_allclose(
        scores.column("margin").to_numpy(),
        scores.column("reward_chosen").to_numpy() - scores.column("reward_rejected").to_numpy(),
        atol=1e-6,
    )
    hist = m["train_loss_history"]
    assert m["steps"] == 3 * 8 and len(hist) == 24
    assert np.mean(hist[-4:]) < np.mean(hist[:4]) - 0.05, hist
    assert m["val_accuracy"] >= 0.75, m
    assert m["val_n"] == 32 and m["val_tokens_per_s"] > 0 and m["step_time_s"] > 0
    mdir = Path(m["model_dir"])
    assert (mdir / "config.json").exists() and (Path(m["checkpoint_dir"]) / "train_state.pt").exists()
    assert not (mdir / "adapter_config.json").exists()
    # plain transformers, no mars_ray: scores reproduce the in-memory model's validation metrics
    model = AutoModelForSequenceClassification.from_pretrained(mdir).eval()
    rc, rr = _score(model, AutoTokenizer.from_pretrained(mdir), val_path)
    assert pair_metrics(rc, rr)["margin_mean"] == pytest.approx(m["val_margin_mean"], abs=1e-5)
    assert pair_metrics(rc, rr)["accuracy"] == m["val_accuracy"]
    state = torch.load(Path(m["checkpoint_dir"]) / "train_state.pt", weights_only=False)
    assert state["passes_done"] == 3 and state["optimizer"]["state"] and "torch" in state["rng"]

    # warm start from the trained folder, full fine-tuning, margin term, max_steps
    m2 = fit_reward_model(
        _cfg(**{"train.lora": False, "train.lr": 1e-3, "train.max_steps": 2, "train.margin_term": True}),
        FitSpec(
            init_model=str(mdir),
            train_path=train_path,
            val_path=val_path,
            run_dir=tmp_path,
            name="warm",
            margin_column="weight",
            epoch=2,
        ),
    )
    assert m2["steps"] == 2
    assert m2["train_loss_first"] > 0.0


def test_fit_rejects_missing_column(tiny_bert_dir, data_files, tmp_path):
    from mars_ray.train import FitSpec, fit_reward_model

    with pytest.raises(ValueError, match="nope"):
        fit_reward_model(
            _cfg(),
            FitSpec(
                init_model=str(tiny_bert_dir),
                train_path=data_files[0],
                val_path=None,
                run_dir=tmp_path,
                name="bad",
                weights_column="nope",
            ),
        )


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ddp_two_workers_one_pass(ray_local, tiny_bert_dir, data_files, tmp_path):
    from mars_ray.train import FitSpec, fit_reward_model

    cfg = _cfg(**{"train.num_workers": 2, "train.passes": 1, "train.cpus_per_worker": 1.0})
    m = fit_reward_model(
        cfg,
        FitSpec(
            init_model=str(tiny_bert_dir),
            train_path=data_files[0],
            val_path=data_files[1],
            run_dir=tmp_path,
            name="ddp2",
        ),
    )
    assert m["world_size"] == 2
    assert m["steps"] == 4  # 64 pairs / 2 workers / 8 per micro-batch
    assert m["val_n"] == 32 and 0.0 <= m["val_accuracy"] <= 1.0
    assert Path(m["model_dir"], "config.json").exists()

    # Same run name again with one more pass: resumes from the checkpoint (pass 1 is not redone).
    cfg2 = _cfg(**{"train.num_workers": 2, "train.passes": 2, "train.cpus_per_worker": 1.0})
    m2 = fit_reward_model(
        cfg2,
        FitSpec(
            init_model=str(tiny_bert_dir),
            train_path=data_files[0],
            val_path=data_files[1],
            run_dir=tmp_path,
            name="ddp2",
        ),
    )
    assert m2["passes_done"] == 2 and m2["steps"] == 8
    assert m2["train_loss_history"][:4] == pytest.approx(m["train_loss_history"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.e2e)])
def test_deepspeed_zero_matches_ddp_first_step_on_minilm(ray_local, data_files, tmp_path, stage):
    """The real MiniLM backbone (builtin:minilm), a few steps under Ray Train with DeepSpeed ZeRO on
    CPU (gloo): the loss equals the plain path's on the same batches; the saved model loads as a
    plain HF folder and scores like the trained engine did."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.train import FitSpec, fit_reward_model

    over = {"train.passes": 1, "train.max_steps": 2, "train.lr": 1e-4}
    kw = dict(init_model="builtin:minilm", train_path=data_files[0], val_path=data_files[1], run_dir=tmp_path)
    ref = fit_reward_model(_cfg(**over), FitSpec(name="ref", **kw))
    cfg = _cfg(**over, **{"train.num_workers": 1, "deepspeed.enabled": True, "deepspeed.stage": stage})
    m = fit_reward_model(cfg, FitSpec(name=f"ds{stage}", **kw))
    assert m["steps"] == 2
    assert m["train_loss_history"][0] == pytest.approx(ref["train_loss_history"][0], abs=1e-4)
    assert m["train_loss_history"][1] == pytest.approx(ref["train_loss_history"][1], abs=1e-3)
    model = AutoModelForSequenceClassification.from_pretrained(m["model_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(m["model_dir"])
    rc, rr = _score(model, tok, data_files[1])
    assert np.mean(rc > rr) == pytest.approx(m["val_accuracy"])  # the saved weights are the trained ones


def test_disable_dropout_makes_training_forwards_deterministic(tiny_bert_dir, tiny_llama_dir):
    import torch

    from mars_ray.models.reward import disable_dropout, load_reward_model

    model, tok = load_reward_model(str(tiny_bert_dir), seed=0, new_head=True)
    model.train()
    enc = tok(["a prompt and a fairly long response to it"] * 4, return_tensors="pt")
    with torch.no_grad():
        assert not torch.equal(model(**enc).logits, model(**enc).logits)  # dropout is on in train mode
        assert disable_dropout(model) > 0
        assert torch.equal(model(**enc).logits, model(**enc).logits)
    assert disable_dropout(model) == 0
    # float attention-dropout attributes (Llama-style) are turned off too
    llama, _ = load_reward_model(str(tiny_llama_dir), seed=0, new_head=True)
    attn = [m for m in llama.modules() if hasattr(m, "attention_dropout")]
    assert attn
    for m in attn:
        m.attention_dropout = 0.3
    assert disable_dropout(llama) >= len(attn) and all(m.attention_dropout == 0.0 for m in attn)


def test_train_state_loads_with_weights_only_and_rng_round_trips(tmp_path):
    """The checkpoint's training state holds tensors and plain values only (read with
    weights_only=True); numpy's RNG state survives the round trip; anything else is refused."""
    import random

    import numpy as np
    import torch

    from mars_ray.core.jsonable import plain
    from mars_ray.train.loop import _rng_state, _set_rng_state, load_train_state

    np.random.seed(3)
    random.seed(3)
    state = {
        "trainable": {"w": torch.ones(2)},
        "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], fused=False).state_dict(),
        "rng": _rng_state(),
        "metrics": plain({"val_accuracy": np.float64(0.5), "hist": np.arange(3.0), "n": np.int64(4)}),
    }
    expected = (np.random.rand(), random.random())
    torch.save(state, tmp_path / "state.pt")
    back = load_train_state(tmp_path / "state.pt")
    assert back["metrics"] == {"val_accuracy": 0.5, "hist": [0.0, 1.0, 2.0], "n": 4}
    _set_rng_state(back["rng"])
    assert (np.random.rand(), random.random()) == expected
    torch.save({"rng": np.random.get_state()}, tmp_path / "old.pt")  # a pickled ndarray: refused
    with pytest.raises(ValueError, match="older mars_ray cannot be resumed"):
        load_train_state(tmp_path / "old.pt")


def _fit_once(tiny_bert_dir, tmp_path, rows, name, **over):
    from mars_ray.train import FitSpec, fit_reward_model

    train = _write(tmp_path / f"{name}.parquet", rows)
    return fit_reward_model(
        _cfg(**over),
        FitSpec(init_model=str(tiny_bert_dir), train_path=train, val_path=train, run_dir=tmp_path / name, name=name),
    )


def test_margin_term_uses_the_label_margins(tiny_bert_dir, tmp_path):
    from mars_ray.core.schema import MARGIN

    rows = _pairs(16, 5)
    one_step = {"train.max_steps": 1, "train.passes": 1, "train.margin_term": True}
    # no pair has a margin: a clear error, not a silent margin of 0
    with pytest.raises(ValueError, match="no pair has a value in column 'margin'"):
        _fit_once(tiny_bert_dir, tmp_path, rows, "none", **one_step)
    # margin 3 on every pair raises the first step's loss from about log 2 to about -log σ(-3)
    zero = _fit_once(tiny_bert_dir, tmp_path, [{**r, MARGIN: 0.0} for r in rows], "zero", **one_step)
    three = _fit_once(tiny_bert_dir, tmp_path, [{**r, MARGIN: 3.0} for r in rows], "three", **one_step)
    half = [{**r, MARGIN: 3.0 if i % 2 else None} for i, r in enumerate(rows)]  # missing counts as 0
    mixed = _fit_once(tiny_bert_dir, tmp_path, half, "mixed", **one_step)
    l0, l3, lm = (m["train_loss_history"][0] for m in (zero, three, mixed))
    assert l0 == pytest.approx(math.log(2), abs=0.05)
    assert l3 == pytest.approx(_nll(-3.0), abs=0.1)
    assert l0 < lm < l3


def test_center_rewards_keeps_rewards_near_zero(tiny_bert_dir, tmp_path):
    rows = _pairs(64, 1)
    plain = _fit_once(tiny_bert_dir, tmp_path, rows, "plain")
    centered = _fit_once(tiny_bert_dir, tmp_path, rows, "centered", **{"train.center_rewards": 1.0})

    def offset(m):
        return abs(m["val_chosen_mean"] + m["val_rejected_mean"])

    assert centered["val_accuracy"] >= 0.75, centered
    assert offset(centered) < 0.5 * offset(plain), (offset(centered), offset(plain))
