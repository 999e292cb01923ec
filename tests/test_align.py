"""The policy stage on local Ray: TRL GRPO on Ray Train workers against a real Ray Serve deployment
of a reward model, resume after a killed driver, and win-rates judged by a local model and through
a real OpenAI-compatible HTTP server (both orders asked)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mars_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny(tiny_bert_rm_dir, tiny_llama_dir, out: Path, **over) -> list[str]:
    args = {
        "output.dir": str(out),
        "rl.policy": str(tiny_llama_dir),
        "model.reward": str(tiny_bert_rm_dir),
        "model.cache_dir": str(out.parent / "cache"),
        "rl.steps": "2",
        "rl.num_generations": "2",
        "rl.max_new_tokens": "8",
        "rl.num_prompts": "6",
        "rl.save_steps": "1",
        "rl.lr": "1e-3",
        "serve.port": str(_free_port()),
        "rl.eval_prompts": "4",
        "rl.eval_max_new_tokens": "8",
        **over,
    }
    return [t for k, v in args.items() for t in (f"--{k}", v)]


def _lora_b(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_B" in k}


@pytest.fixture(scope="module")
def table2(ray_local, tmp_path_factory, tiny_bert_rm_dir, tiny_llama_dir):
    """`mars-ray align-compare` over two reward models (training run directories: a model/ folder and
    the run's config.yaml), each deployed in turn on Ray Serve: two aligned policies, one win-rate."""
    import shutil

    from tiny_models import tiny_bert, tiny_reward_model

    from mars_ray.config import Config

    root = tmp_path_factory.mktemp("table2")
    runs = []
    for strategy, seed in (("mars", 0), ("uniform", 0)):
        run = root / f"rm-{strategy}"
        if strategy == "mars":
            shutil.copytree(tiny_bert_rm_dir, run / "model")
        else:
            # another reward model: other rewards, other policy
            tiny_reward_model(tiny_bert(root / "bert1", seed=1), run / "model", seed=1)
        c = Config()
        c.mars.strategy, c.seed = strategy, seed
        c.save(run)
        runs.append(str(run))
    out = root / "out"
    args = _tiny(tiny_bert_rm_dir, tiny_llama_dir, out, **{"rl.reward_models": f"[{runs[0]}, {runs[1]}]"})
    assert main(["align-compare", *args]) == 0
    return out


@pytest.fixture(scope="module")
def aligned(table2):
    return table2 / "policies" / "mars-seed0"


@pytest.mark.e2e
def test_align_compare_aligns_one_policy_per_reward_model_and_judges_them(table2):
    res = json.loads((table2 / "align_compare.json").read_text())
    assert list(res["policies"]) == ["mars-seed0", "uniform-seed0"]
    for _name, p in res["policies"].items():
        s = json.loads((Path(p["dir"]) / "align_summary.json").read_text())
        assert s["steps"] == 2 and s["reward_model"] == p["reward_model"] and s["seed"] == 0
        assert s["served_counters_delta"]["pairs"] == 4  # each policy's rewards came from its own deployment
    (pair,) = res["pairs"].values()
    assert (pair["policy_a"], pair["policy_b"]) == ("mars-seed0", "uniform-seed0")
    assert pair["win"] + pair["tie"] + pair["loss"] + pair["invalid"] == 4
    assert "| mars-seed0 vs uniform-seed0 |" in (table2 / "align_compare.md").read_text()
    # A rerun keeps the finished policies and win-rates (nothing is trained again).
    before = {n: (Path(p["dir"]) / "align_summary.json").stat().st_mtime for n, p in res["policies"].items()}
    cfg = table2 / "config.yaml"
    assert main(["align-compare", "--config", str(cfg)]) == 0
    assert before == {n: (Path(p["dir"]) / "align_summary.json").stat().st_mtime for n, p in res["policies"].items()}


@pytest.mark.e2e
def test_align_updates_the_adapter_with_rewards_from_serve(aligned, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    s = json.loads((aligned / "align_summary.json").read_text())
    assert s["steps"] == 2 and s["algorithm"] == "grpo" and s["kl_coef"] == 0.02 and s["clip"] == 0.2
    assert "DeploymentHandle" in s["reward_source"] and s["reward_model"].endswith("rm-mars")
    # Every completion was scored by the Serve deployment: 2 steps x 1 prompt x 2 completions.
    assert s["reward_items"] == 4 and s["reward_calls"] == 2
    assert s["served_counters_delta"]["pairs"] == 4 and s["served_counters_delta"]["requests"] == 2
    # LoRA B starts at zero: a non-zero B is an adapter that changed.
    b = _lora_b(aligned / "policy_adapter")
    assert b and max(float(t.abs().max()) for t in b.values()) > 0 and s["lora_b_norm"] > 0
    # The merged policy is a plain HF folder whose weights moved away from the base.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pol = AutoModelForCausalLM.from_pretrained(aligned / "policy")
    name = next(n for n, _ in base.named_parameters() if "q_proj" in n)
    assert not torch.equal(dict(base.named_parameters())[name], dict(pol.named_parameters())[name])
    rows = [json.loads(x) for x in (aligned / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in (
            "reward",
            "kl",
            "loss",
            "completions/mean_length",
            "time/rollout_s",
            "time/reward_s",
            "time/update_s",
        ):
            assert k in r, k
        assert r["time/rollout_s"] > 0 and r["time/reward_s"] > 0 and r["reward_items"] == 2
    assert (aligned / "config.yaml").exists() and len((aligned / "prompts.jsonl").read_text().splitlines()) == 6
    # The directory is not silently reused.
    assert main(["align", "--output.dir", str(aligned)]) == 1


@pytest.mark.e2e
def test_align_resumes_after_the_driver_is_killed(ray_local, tmp_path, tiny_bert_rm_dir, tiny_llama_dir):
    out = tmp_path / "run"
    # sized down: 3 steps (was 4); the kill still lands after the first checkpoint
    args = _tiny(tiny_bert_rm_dir, tiny_llama_dir, out, **{"rl.steps": "3", "rl.reward_transport": "http"})
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mars_ray.cli", "align", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 400
    try:
        while not list((out / "ray_train" / "policy").glob("checkpoint_*")):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "align_summary.json").exists()
    assert (
        main(["align", "--resume", str(out), "--serve.port", str(_free_port())]) == 2
    )  # only resources/reward may change
    assert main(["align", "--resume", str(out)]) == 0
    s = json.loads((out / "align_summary.json").read_text())
    assert s["worker"]["resumed_from"] and s["worker"]["global_step"] == 3
    assert s["steps"] == 3 and s["reward_source"].startswith("HTTP")
    assert sorted({json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()}) == [1, 2, 3]


@pytest.mark.e2e
def test_winrate_with_a_local_logits_judge(aligned, tmp_path, tiny_llama_dir):
    out = tmp_path / "wr"
    args = [
        "winrate",
        "--policy-a",
        str(aligned),
        "--policy-b",
        str(tiny_llama_dir),
        "--names",
        "aligned,base",
        "--output.dir",
        str(out),
        "--rl.judge_model",
        str(tiny_llama_dir),
        "--rl.eval_prompts",
        "4",
        "--rl.eval_max_new_tokens",
        "8",
        "--model.cache_dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    s = json.loads((out / "winrate.json").read_text())
    assert s["n_prompts"] == 4 and s["win"] + s["tie"] + s["loss"] + s["invalid"] == 4
    assert s["invalid"] == 0 and s["judge_calls"] == 8 and s["orders"] == 2  # logits always give a verdict
    assert 0.0 <= s["win_rate"] <= 1.0 and s["ci_low"] <= s["win_rate"] <= s["ci_high"]
    verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 4
    for v in verdicts:  # both orders were asked, each with the judge's log-probabilities
        for order in ("a_shown_first", "b_shown_first"):
            assert v[order]["verdict"] in ("A", "B", "tie") and v[order]["logp_a"] <= 0
    resp = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert all(r["response_a"] is not None and r["response_b"] is not None for r in resp)
    assert (out / "winrate.md").read_text().startswith("# Win-rate: aligned vs base")
    # Responses come from the cache on a rerun.
    assert main(args) == 0
    s2 = json.loads((out / "winrate.json").read_text())
    assert s2["generation"]["a"]["generated"] == 0 and s2["generation"]["a"]["hits"] == 4
    assert (s2["win"], s2["tie"], s2["loss"]) == (s["win"], s["tie"], s["loss"])


@pytest.mark.e2e
def test_winrate_through_a_real_openai_compatible_server(aligned, tmp_path, tiny_llama_dir):
    from mars_ray.generation import GenParams
    from mars_ray.generation.local import LocalChatGenerator
    from mars_ray.serve.llm_server import run_server

    gen = LocalChatGenerator(str(tiny_llama_dir), GenParams(max_new_tokens=8), batch_size=8)
    with run_server(gen, served_model="judge") as server:
        out = tmp_path / "wr"
        env_key = "MARS_TEST_JUDGE_KEY"
        os.environ[env_key] = "unused-local-key"
        try:
            assert (
                main(
                    [
                        "winrate",
                        "--policy-a",
                        str(aligned),
                        "--policy-b",
                        str(tiny_llama_dir),
                        "--output.dir",
                        str(out),
                        "--rl.judge_backend",
                        "openai",
                        "--rl.judge_mode",
                        "text",
                        "--rl.judge_model",
                        "judge",
                        "--rl.judge_base_url",
                        server.url,
                        "--rl.judge_api_key_env",
                        env_key,
                        "--rl.eval_prompts",
                        "3",
                        "--rl.eval_max_new_tokens",
                        "8",
                        "--model.cache_dir",
                        str(tmp_path / "cache"),
                    ]
                )
                == 0
            )
        finally:
            os.environ.pop(env_key, None)
        stats = server.stats()
    s = json.loads((out / "winrate.json").read_text())
    # 3 prompts x both orders; a request asked before (e.g. identical responses in both orders) is a cache hit.
    g = s["judge_generation"]
    assert s["judge_calls"] == 6 and g["requested"] == 6 and g["generated"] + g["hits"] == 6
    assert stats["completed"] == g["generated"] >= 3
    assert s["win"] + s["tie"] + s["loss"] + s["invalid"] == 3  # a random tiny judge may give no verdict: counted
    verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert all("text" in v["a_shown_first"] and "text" in v["b_shown_first"] for v in verdicts)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_lora_two_steps_against_served_minilm_then_judged(ray_local, tmp_path):
    """The issue's marked test: builtin:smollm2 + LoRA, 2 optimisation steps on CPU, rewards from a
    live Serve deployment of builtin:minilm; then the aligned policy against its base, judged by
    SmolLM2's next-token probabilities in both orders. Prints the time per step and per rollout.
    Sized down for the suite's time (was 4 completions of 32 tokens for 8 prompts, 4 judged).
    The reward model is MiniLM with a seeded head saved as a reward model (a bare backbone is
    refused: it would be served with a random head)."""
    from tiny_models import tiny_reward_model

    from mars_ray.models import minilm_path

    rm = tiny_reward_model(Path(minilm_path()), tmp_path / "minilm_rm")
    out = tmp_path / "run"
    assert (
        main(
            [
                "align",
                "--output.dir",
                str(out),
                "--rl.policy",
                "builtin:smollm2",
                "--model.reward",
                str(rm),
                "--rl.steps",
                "2",
                "--rl.num_generations",
                "2",
                "--rl.max_new_tokens",
                "16",
                "--rl.num_prompts",
                "4",
                "--rl.lr",
                "1e-4",
                "--serve.port",
                str(_free_port()),
                "--model.cache_dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    s = json.loads((out / "align_summary.json").read_text())
    assert s["steps"] == 2 and s["served_counters_delta"]["pairs"] == 4 and s["reward_items"] == 4
    b = _lora_b(out / "policy_adapter")
    assert max(float(t.abs().max()) for t in b.values()) > 0
    t = s["time_per_step"]
    print(
        f"\nSmolLM2 GRPO step {t['step_s']:.2f}s: rollout {t['rollout_s']:.2f}s, reward {t['reward_s']:.2f}s, "
        f"update {t['update_s']:.2f}s; fit {s['fit_s']:.0f}s, total {s['total_s']:.0f}s"
    )
    wr = tmp_path / "wr"
    assert (
        main(
            [
                "winrate",
                "--policy-a",
                str(out),
                "--policy-b",
                "builtin:smollm2",
                "--output.dir",
                str(wr),
                "--rl.eval_prompts",
                "2",
                "--rl.eval_max_new_tokens",
                "16",
                "--model.cache_dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    w = json.loads((wr / "winrate.json").read_text())
    assert w["n"] == 2 and w["judge_calls"] == 4 and w["judge"] == "builtin:smollm2"


@pytest.mark.parametrize(
    ("over", "want"),
    [
        ({}, {"beta": 0.02, "epsilon": 0.2, "scale_rewards": "group", "use_vllm": False}),
        ({"rl.kl_coef": 0.0, "rl.scale_rewards": "batch"}, {"beta": 0.0, "scale_rewards": "batch"}),
        ({"rl.scale_rewards": "none", "rl.clip": 0.1}, {"scale_rewards": "none", "epsilon": 0.1}),
        ({"rl.algorithm": "rloo", "rl.normalize_advantages": True}, {"normalize_advantages": True}),
        ({"rl.algorithm": "rloo"}, {"normalize_advantages": False, "beta": 0.02}),
    ],
)
def test_rl_options_reach_trl_configs(over, want, tmp_path):
    """Every optimisation option of cfg.rl reaches TRL's own config class (GRPOConfig or
    RLOOConfig, which validate them), with the values asked for."""
    from mars_ray.config import Config
    from mars_ray.rl.align import _trl_classes, trl_args

    cfg = Config.load(overrides={**over, "rl.steps": 3, "rl.num_generations": 4, "rl.prompts_per_step": 2})
    config_cls, _ = _trl_classes(cfg.rl.algorithm)
    args = config_cls(**trl_args(cfg.rl, hf_dir=str(tmp_path), seed=5, use_gpu=False, bf16=False))
    for key, value in want.items():
        assert getattr(args, key) == value, key
    assert (args.max_steps, args.num_generations, args.per_device_train_batch_size) == (3, 4, 8)
    assert args.use_cpu and args.seed == 5 and args.learning_rate == cfg.rl.lr


def test_vllm_rollouts_need_gpus_and_pass_their_mode():
    from mars_ray.config import Config
    from mars_ray.rl.align import trl_args

    with pytest.raises(ValueError, match="rl.use_vllm needs rl.use_gpu"):
        Config.load(overrides={"rl.use_vllm": True})
    cfg = Config.load(overrides={"rl.use_vllm": True, "rl.use_gpu": True, "rl.vllm_mode": "server"})
    args = trl_args(cfg.rl, hf_dir="x", seed=0, use_gpu=True, bf16=True)
    assert args["use_vllm"] is True and args["vllm_mode"] == "server" and args["bf16"] and not args["use_cpu"]


def test_a_reward_token_missing_where_the_rewards_are_fetched_is_named():
    """`rl.reward_token_env` names a variable the Ray workers read; unset there, the first reward
    call stops with what to do, instead of a 401 deep inside TRL."""
    from mars_ray.rl.rewards import RewardTarget, ServedReward

    os.environ.pop("MARS_TEST_NO_SUCH_TOKEN", None)
    reward = ServedReward(RewardTarget(url="http://127.0.0.1:9", token_env="MARS_TEST_NO_SUCH_TOKEN"))
    with pytest.raises(RuntimeError, match="MARS_TEST_NO_SUCH_TOKEN is not set.*secrets.env"):
        reward.score(["p"], ["r"])


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_rloo_full_finetune_without_kl_on_two_workers_against_a_reward_url(
    ray_local, tmp_path, tiny_bert_rm_dir, tiny_llama_dir
):
    """The options no other test runs end to end: `rl.algorithm rloo`, `rl.lora false`,
    `rl.kl_coef 0`, `rl.num_workers 2`, rewards from an already running `mars-ray serve`
    (`rl.reward_url`, nothing deployed), `rl.max_failures` reaching Ray Train."""
    import torch
    from _serve_proc import start_serve
    from transformers import AutoModelForCausalLM

    port = _free_port()
    log = tmp_path / "serve.log"
    args = ["--model", str(tiny_bert_rm_dir), "--serve.port", str(port), "--resources.num_cpus", "1"]
    proc = start_serve([*args, "--serve.num_cpus", "0.5", "--output.dir", str(tmp_path / "serve")], log)
    try:
        assert f"127.0.0.1:{port}" in log.read_text(), log.read_text()[-3000:]
        url = f"http://127.0.0.1:{port}"
        out = tmp_path / "rloo"
        over = {
            "rl.algorithm": "rloo",
            "rl.lora": "false",
            "rl.kl_coef": "0",
            "rl.num_workers": "2",
            "rl.cpus_per_worker": "0.5",
            "rl.max_failures": "0",
            "rl.reward_url": url,
        }
        assert main(["align", *_tiny(tiny_bert_rm_dir, tiny_llama_dir, out, **over)]) == 0
        s = json.loads((out / "align_summary.json").read_text())
        assert (s["algorithm"], s["lora"], s["kl_coef"], s["num_workers"]) == ("rloo", False, 0.0, 2)
        assert s["worker"]["world_size"] == 2 and s["reward_source"] == f"HTTP {url}" and s["adapter"] is None
        assert s["reward_items"] > 0 and not (out / "policy_adapter").exists(), s
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        pol = dict(AutoModelForCausalLM.from_pretrained(out / "policy").named_parameters())
        moved = [n for n, p in base.named_parameters() if not torch.equal(p, pol[n])]
        assert len(moved) > 10, moved  # full fine-tuning: the layers moved, not an adapter
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
