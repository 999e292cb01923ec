"""Ray Train faults: a worker that dies mid-pass (DDP, and DeepSpeed ZeRO-3 on 2 CPU workers)
resumes from the checkpoint inside the pass with its optimizer state, and a checkpoint is never
resumed on other data. (Its own module, so the test processes share these long tests out.)"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from test_pipeline import loop_cfg
from test_train import _cfg, _pairs, _score, _write

from mars_ray.core import chaos

pytestmark = pytest.mark.e2e  # restarts and resumes at full fidelity: `make test-all`

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    return _write(d / "train.parquet", _pairs(64, 1), weight=1.0), _write(d / "val.parquet", _pairs(32, 2))


@pytest.mark.ray
def test_checkpoint_inside_a_pass_resumes_at_its_batch_and_refuses_other_data(
    ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir, monkeypatch
):
    """train.checkpoint_steps 2: rank 0 fails before step 5 of a 10-step pass; FailureConfig
    restarts the worker group from the step-4 checkpoint at its place in the same batch order (not
    from the start of the pass) and training ends where an unfaulted run ends. Without restarts
    the error surfaces. Resuming that run on other data is refused."""
    import pyarrow as pa

    from mars_ray.data import read_preferences
    from mars_ray.train.loop import FitSpec, fit_reward_model

    over = {"train.passes": "1", "train.num_workers": "1", "data.max_pairs": "40", "train.checkpoint_steps": "2"}
    cfg = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "midpass", **over)
    t = read_preferences(cfg.data, seed=0).table
    pq.write_table(t, tmp_path / "train.parquet")
    steps = -(-t.num_rows // cfg.train.batch_size)
    assert steps == 10
    kw = dict(
        init_model=str(tiny_bert_dir),
        train_path=tmp_path / "train.parquet",
        val_path=tmp_path / "train.parquet",
        run_dir=tmp_path / "ray_train",
    )
    # The reference trains in this process (no worker group to start): the same loop, the same numbers.
    local = loop_cfg(tmp_path, tiny_bert_dir, tiny_llama_dir, "midpass", **over | {"train.num_workers": "0"})
    clean = fit_reward_model(local, FitSpec(name="clean", **kw))
    marker = tmp_path / "fault.marker"
    # rank 0 raises before optimizer step 5 (the point's 6th visit), once: the marker file records it
    monkeypatch.setenv(chaos.ENV, f"train.step.epoch1@6:raise={marker}")
    faulted = fit_reward_model(cfg, FitSpec(name="faulted", max_failures=1, **kw))
    assert marker.exists(), "the fault was never injected"
    assert "resumed_from_step" not in clean and faulted["resumed_from_step"] == 4
    assert faulted["steps"] == clean["steps"] == steps
    assert faulted["train_loss_history"] == pytest.approx(clean["train_loss_history"], rel=1e-4, abs=1e-5)
    assert faulted["val_margin_mean"] == pytest.approx(clean["val_margin_mean"], rel=1e-3, abs=1e-5)

    marker.unlink()
    monkeypatch.setenv(chaos.ENV, f"train.step.epoch1@2:raise={marker}")
    with pytest.raises(Exception, match="injected fault"):  # no restarts allowed: the error surfaces
        fit_reward_model(cfg, FitSpec(name="fatal", max_failures=0, **kw))
    monkeypatch.delenv(chaos.ENV)

    other = tmp_path / "other.parquet"
    pq.write_table(pa.concat_tables([t.slice(1), t.slice(0, 1)]), other)  # the same pairs, another order
    with pytest.raises(Exception, match="trained on other data"):
        fit_reward_model(cfg, FitSpec(name="faulted", **{**kw, "train_path": other}))


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("stage", "batch", "accum", "every", "fail_at", "steps", "resumed"),
    [
        # ZeRO-3 (parameters, gradients and optimizer state partitioned). The loop saves and
        # restores ZeRO-2 through the same engine calls; its one stage-specific branch is ZeRO-3's
        # gather before the model is saved, checked below. 32 pairs per rank in micro-batches of 5:
        # 7 micro-batches, DeepSpeed steps after 2, 4, 6 (the 7th accumulates without a step): 3
        # steps, not the 4 a per-pass count would give; rank 0 fails after the step-2 checkpoint.
        (3, 5, 2, 1, 2, 3, 2),
    ],
)
def test_deepspeed_two_workers_resume_mid_pass_with_their_optimizer_state(
    ray_local, tiny_bert_dir, data_files, tmp_path, monkeypatch, stage, batch, accum, every, fail_at, steps, resumed
):
    """ZeRO-3 on 2 CPU workers (gloo): rank 0 fails mid-pass; the worker group restarts from the
    last checkpoint inside the pass, each rank loading its own optimizer and parameter partitions,
    and the losses after the restart equal an uninterrupted run's (Adam moments restored: with a
    fresh optimizer they differ). The step count is DeepSpeed's own. The saved model (gathered from
    the partitions) loads as a plain HF folder and scores as the trained engine did."""
    pytest.importorskip("deepspeed")
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.train import FitSpec, fit_reward_model

    over = {
        "train.num_workers": 2,
        "train.cpus_per_worker": 1,
        "train.batch_size": batch,
        "train.grad_accum": accum,
        "train.passes": 1,
        "train.checkpoint_steps": every,
        "deepspeed.enabled": True,
        "deepspeed.stage": stage,
    }
    cfg = _cfg(**over)
    kw = dict(init_model=str(tiny_bert_dir), train_path=data_files[0], val_path=data_files[1], run_dir=tmp_path)
    clean = fit_reward_model(cfg, FitSpec(name="clean", **kw))
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv(chaos.ENV, f"train.step.epoch1@{fail_at + 1}:raise={marker}")
    faulted = fit_reward_model(cfg, FitSpec(name="faulted", max_failures=1, **kw))
    assert marker.exists(), "the fault was never injected"
    assert clean["steps"] == faulted["steps"] == clean["deepspeed_global_steps"] == steps
    assert faulted["deepspeed_global_steps"] == steps and faulted["resumed_from_step"] == resumed
    # tolerance: the same float32 arithmetic on the same batches in the same order (gloo sums)
    assert faulted["train_loss_history"] == pytest.approx(clean["train_loss_history"], rel=1e-5, abs=1e-6)
    assert faulted["val_margin_mean"] == pytest.approx(clean["val_margin_mean"], rel=1e-4, abs=1e-6)
    model = AutoModelForSequenceClassification.from_pretrained(faulted["model_dir"]).eval()
    rc, rr = _score(model, AutoTokenizer.from_pretrained(faulted["model_dir"]), data_files[1])
    assert np.mean(rc > rr) == pytest.approx(faulted["val_accuracy"])
