"""What a person reads: stage lines, the quiet defaults, the end-of-run summary (no Ray)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from mars_ray import console


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in (console.VERBOSE_ENV, console.PROGRESS_ENV, console.BACKEND_LOG_ENV):
        monkeypatch.delenv(k, raising=False)


def test_plain_stage_is_one_line_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv(console.PROGRESS_ENV, "plain")
    with console.stage("[epoch 1/2] paraphrase", total=24, unit="texts") as st:
        assert console.current() is st
        st.advance(10)
        st.advance(100)  # never past the total
        st.done("21 of 24 passed the gate")
    assert console.current() is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[epoch 1/2] paraphrase 24/24 texts: 21 of 24 passed the gate (")


def test_failed_stage_prints_nothing_and_reraises(monkeypatch, capsys):
    monkeypatch.setenv(console.PROGRESS_ENV, "plain")
    with pytest.raises(RuntimeError, match="boom"), console.stage("[epoch 1/2] train"):
        raise RuntimeError("boom")
    assert capsys.readouterr().out == "" and console.current() is None


def test_bar_mode_draws_on_stderr_and_keeps_stdout_for_lines(monkeypatch, capsys):
    monkeypatch.setenv(console.PROGRESS_ENV, "bar")
    with console.stage("[epoch 1/2] score margins", total=4, unit="pairs") as st:
        st.advance(2)
        console.say("a line for the user")
        st.done("done")
    cap = capsys.readouterr()
    assert "a line for the user" in cap.out
    assert "[epoch 1/2] score margins" in cap.err and "4/4" in cap.err and "done" in cap.err


def test_quiet_by_default_verbose_brings_the_libraries_back(monkeypatch):
    assert not console.is_verbose()
    env = console.library_env()
    assert env["TRANSFORMERS_VERBOSITY"] == "error" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert console.ray_init_kwargs() == {"log_to_driver": False, "logging_level": logging.WARNING}
    with console.quiet_ray_core():
        assert os.environ[console.BACKEND_LOG_ENV] == "fatal"  # the driver's C++ error lines
    assert console.BACKEND_LOG_ENV not in os.environ
    assert console.worker_log_env() == {console.BACKEND_LOG_ENV: "info"}  # workers log as usual

    console.set_verbose(True)
    try:
        assert console.is_verbose() and console.library_env() == {} and console.ray_init_kwargs() == {}
        with console.quiet_ray_core():
            assert console.BACKEND_LOG_ENV not in os.environ
    finally:
        console.set_verbose(False)


def test_verbose_flag_reaches_the_environment(monkeypatch):
    from mars_ray.cli import main

    assert main(["config", "show", "--verbose"]) == 0
    try:
        assert console.is_verbose()
    finally:
        console.set_verbose(False)


def _run_dir(tmp_path, ess=0.5, share=0.37):
    run = tmp_path / "run"
    for t in (1, 2):
        ep = run / "epochs" / f"{t:03d}"
        ep.mkdir(parents=True)
        diag = {"ess_ratio": ess + 0.1 * (2 - t), "q_share_lowest_decile": share}
        (ep / "augment_summary.json").write_text(json.dumps({"diagnostics": diag}))
    return run


def test_end_summary_says_what_improved_where_things_are_and_how_to_serve(tmp_path):
    from mars_ray.pipeline import end_summary

    run = _run_dir(tmp_path)
    final = {"test_accuracy": 0.909, "test_snr": 2.36, "test_n": 33, "train_loss": 0.117}
    summary = {
        "run_dir": str(run),
        "strategy": "mars",
        "epochs": 2,
        "model": str(run / "model"),
        "seconds": 248.4,
        "final": {**final, "original_pairs": 267, "synthetic_total": 32},
        "base": {"test_accuracy": 0.333, "test_snr": -0.24},
        "warmup": {"passes": 1},
    }
    lines = end_summary(summary)
    assert len(lines) <= 10
    text = "\n".join(lines)
    assert lines[0].startswith("done in 4 min 8 s: mars, 2 epoch(s), 267 human + 32 synthetic")
    assert "0.333 -> 0.909" in text and "-0.240 -> 2.360" in text and "33 held-out pairs" in text
    assert "effective sample size 0.50 x N" in text and "37%" in text and "(epoch 2)" in text
    assert f"model          {run / 'model'}" in text and str(run / "report.html") in text
    assert lines[-1].strip() == f"serve it       mars-ray serve --model {run}"


def test_end_summary_without_a_test_split_or_an_allocation(tmp_path):
    from mars_ray.pipeline import end_summary

    run = tmp_path / "bare"
    summary = {"run_dir": str(run), "strategy": "none", "epochs": 1, "model": str(run / "model"), "final": {}}
    lines = end_summary(summary)
    assert 4 <= len(lines) <= 10 and not any("test accuracy" in x or "allocation" in x for x in lines)


def test_has_reward_head_reads_the_config_only(tmp_path, tiny_bert_dir):
    from mars_ray.models.resolve import has_reward_head

    assert not has_reward_head("builtin:minilm")  # a sentence-transformers backbone
    conf = json.loads((tiny_bert_dir / "config.json").read_text())
    head = tmp_path / "rm"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({**conf, "architectures": ["BertForSequenceClassification"]}))
    assert has_reward_head(str(head))
    (head / "config.json").write_text(
        json.dumps({**conf, "architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}})
    )
    assert not has_reward_head(str(head))  # a two-label classifier is not a reward model
