"""`mars-ray compare` and `mars-ray sweep` on Ray Tune with tiny models: every trial is a real
MARS loop (stages in the trial's process, Ray Train worker) on local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mars_ray.cli import main
from mars_ray.pipeline import read_metrics

pytestmark = pytest.mark.ray


def _tiny_overrides(tmp_path, bert, llama, out: str, **over) -> list[str]:
    from test_pipeline import loop_cfg

    cfg = loop_cfg(
        tmp_path,
        bert,
        llama,
        out,
        **{
            "resources.in_process": "true",
            "train.num_workers": "1",
            "train.cpus_per_worker": "0.5",
            "mars.epochs": "1",
            **over,
        },
    )
    path = tmp_path / f"{out}.yaml"
    path.write_text(cfg.to_yaml())
    return ["--config", str(path)]


def test_compare_two_strategies_two_seeds(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"q{i}",
                    "chosen": f"a good answer {i}",
                    "rejected": f"no {i}",
                    "subset": "llmbar-natural" if i % 2 else "donotanswer",
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    args = _tiny_overrides(tmp_path, tiny_bert_dir, tiny_llama_dir, "cmp", **{"mars.budget": "6"})
    out = tmp_path / "cmp"
    cli_args = [
        "compare",
        *args,
        "--compare.strategies",
        "[none, uniform]",
        "--compare.seeds",
        "[0, 1]",
        "--compare.max_concurrent",
        "2",
        "--compare.eval_paths",
        f"[{heldout}]",
    ]
    # As if killed after saving its config, before Tune wrote any state (during the generation
    # bank, say): `--resume` has nothing to restore and starts the saved experiment.
    from mars_ray.cli import _parser, _tune_config

    ns, extra = _parser().parse_known_args(cli_args)
    _tune_config(ns, extra)
    assert (out / "experiment_config.yaml").exists() and not (out / "tune").exists()
    rc = main(["compare", "--resume", str(out)])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["trials"] == 4 and sorted(res["strategies"]) == ["none", "uniform"]
    t = res["table"]
    assert t["none"]["seeds"] == [0, 1] and t["uniform"]["seeds"] == [0, 1]
    assert t["none"]["synthetic_pairs"] == 0 and t["uniform"]["synthetic_pairs"] == 6
    # Every number in the table comes from the trials' own run directories.
    for s in ("none", "uniform"):
        for k, seed in enumerate([0, 1]):
            run = out / "trials" / f"strategy={s}_seed={seed}"  # sorted dotted keys: mars.strategy < seed
            final = read_metrics(run)[-1]
            assert t[s]["test_accuracy"]["values"][k] == pytest.approx(final["test_accuracy"])
            ev = json.loads(next((run / "heldout").glob("*/eval.json")).read_text())
            assert ev["n"] == 8 and set(ev["sections"]) == {"Chat Hard", "Safety"}
            assert ev["excluded"] == 0 and Path(ev["excluded_from"]) == run  # the trial's own pairs are left out
            assert t[s]["heldout:accuracy"]["values"][k] == pytest.approx(ev["accuracy"])
    p = res["paired"]["uniform - none | test_accuracy"]
    a, b = t["uniform"]["test_accuracy"]["values"], t["none"]["test_accuracy"]["values"]
    assert p["mean_diff"] == pytest.approx((a[0] - b[0] + a[1] - b[1]) / 2) and p["n"] == 2
    for f in (
        "compare.md",
        "compare.html",
        "val_accuracy_per_epoch.png",
        "accuracy_by_strategy.png",
        "heldout_sections.png",
    ):
        assert (out / f).stat().st_size > 0, f
    # An experiment directory is not silently reused.
    assert main(["compare", *args, "--compare.strategies", "[none]"]) == 2


@pytest.mark.e2e
def test_sweep_restores_after_a_killed_driver_and_exports_the_best_config(
    ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir
):
    args = _tiny_overrides(
        tmp_path, tiny_bert_dir, tiny_llama_dir, "sweep", **{"mars.strategy": "mars-nosem", "mars.epochs": "1"}
    )
    out = tmp_path / "sweep"
    # Sized down (was 2 x 2 trials of 2 epochs, then 3): two one-epoch trials, run one at a time,
    # leave one finished and one not when the driver is killed after the first.
    space = '{"mars.tau": [0.5, 2.0], "mars.budget": [4]}'
    cmd = [sys.executable, "-m", "mars_ray.cli", "sweep", *args, "--tune.space", space, "--tune.scheduler", "fifo"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    try:
        while not list((out / "trials").glob("*/summary.json")):  # one trial finished, others not
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no trial finished in 10 minutes"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "sweep.json").exists()
    assert len(list((out / "trials").glob("*/summary.json"))) < 2

    assert main(["sweep", "--resume", str(out)]) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert len(res["trials"]) == 2 and all(r["val_accuracy"] is not None and not r["error"] for r in res["trials"])
    assert {(r["overrides"]["mars.tau"], r["overrides"]["mars.budget"]) for r in res["trials"]} == {(0.5, 4), (2.0, 4)}
    best = res["best"]
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in res["trials"])
    for f in ("sweep.md", "sweep.html", "sweep_mars_tau.png", "best_config.yaml"):
        assert (out / f).stat().st_size > 0, f
    # The exported config runs as is and reproduces the best trial's metric.
    assert main(["train", "--config", str(out / "best_config.yaml")]) == 0
    again = read_metrics(out / "best_run")[-1]
    assert again["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert again["val_snr"] == pytest.approx(read_metrics(best["run_dir"])[-1]["val_snr"], rel=1e-5)


def test_tune_commands_refuse_training_in_the_driver(tmp_path, capsys):
    """train.num_workers 0 cannot run inside a Ray Tune trial: refused before anything starts."""
    for cmd in (["compare"], ["sweep", "--tune.space", '{"mars.tau": [0.5]}']):
        code = main([*cmd, "--train.num_workers", "0", "--output.dir", str(tmp_path / cmd[0])])
        err = capsys.readouterr().err
        assert code == 1 and "train.num_workers=0" in err and "num_workers 1" in err, err
        assert not (tmp_path / cmd[0]).exists()


def test_compare_fails_loudly_when_its_trials_fail(ray_local, tmp_path, tiny_bert_dir, tiny_llama_dir, capsys):
    """Found on the simulated GPU cluster: every trial errored (their evaluation could not be
    placed) and `mars-ray compare` still exited 0 with an empty table. A held-out file with no
    usable pair makes each trial's evaluation fail; the command now exits 1 naming them."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "", "rejected": "x"}) + "\n" for i in range(3)))
    args = _tiny_overrides(tmp_path, tiny_bert_dir, tiny_llama_dir, "cmpbad", **{"mars.budget": "0"})
    code = main(
        [
            "compare",
            *args,
            "--compare.strategies",
            "[none]",
            "--compare.seeds",
            "[0]",
            "--compare.eval_paths",
            f"[{bad}]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "compare: all 1 trials failed" in err and "'mars.strategy': 'none'" in err, err
