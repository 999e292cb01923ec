"""Every model mars_ray loads goes through the device policy (mars_ray.runtime.pick_device), and the
policy itself on this machine (no GPU). GPU-marked tests run where CUDA exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mars_ray import runtime as D

PKG = Path(__file__).resolve().parents[1] / "mars_ray"
# The calls that put a model somewhere, and the keyword that says where.
LOADERS = {
    "load_reward_model",
    "load_sentence_encoder",
    "load_causal_lm",
    "make_generator",
    "LocalChatGenerator",
    "Seq2SeqGenerator",
    "SentenceTransformer",
    "AutoModelForSequenceClassification.from_pretrained",
    "AutoModelForCausalLM.from_pretrained",
    "AutoModelForSeq2SeqLM.from_pretrained",
}
# Call sites that are the loaders themselves (they take the device as an argument), or pass the
# device inside **kwargs built just before (checked by reading them), with the reason.
EXEMPT = {
    ("models/reward.py", "AutoModelForSequenceClassification.from_pretrained"): "load_reward_model itself",
    ("models/resolve.py", "AutoModelForCausalLM.from_pretrained"): "load_causal_lm itself (its callers place it)",
    ("models/resolve.py", "SentenceTransformer"): "load_sentence_encoder itself",
    ("generation/local.py", "load_causal_lm"): "the generators move it to their device argument",
    ("generation/local.py", "AutoModelForSeq2SeqLM.from_pretrained"): "Seq2SeqGenerator moves it to its device",
    ("generation/local.py", "LocalChatGenerator"): "make_generator passes the caller's device on",
    ("generation/local.py", "Seq2SeqGenerator"): "make_generator passes the caller's device on",
    ("stages/generate.py", "make_generator"): "device in openai_kwargs for the local back ends (pick_device)",
    ("rl/winrate.py", "make_generator"): "device in **local for the local judge (pick_device)",
    ("serve/llm_server.py", "make_generator"): "device in **local (pick_device)",
}


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}" if isinstance(func.value, (ast.Name, ast.Attribute)) else func.attr
    return ""


def test_every_model_load_names_its_device():
    missing, seen = [], set()
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            short = name.split(".")[-1] if name.split(".")[-1] in LOADERS else name
            key = next((n for n in LOADERS if name == n or name.endswith("." + n) or short == n), None)
            if key is None:
                continue
            seen.add(key)
            if (rel, key) in EXEMPT:
                continue
            if not any(kw.arg == "device" for kw in node.keywords):
                missing.append(f"mars_ray/{rel}:{node.lineno}: {name}(...) without device=")
    assert not missing, "model loads outside the device policy:\n" + "\n".join(missing)
    assert {"load_reward_model", "load_sentence_encoder", "make_generator", "LocalChatGenerator"} <= seen


def test_the_policy_here_and_its_override(monkeypatch):
    import torch

    monkeypatch.delenv(D.DEVICE_ENV, raising=False)
    assert D.pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert D.pick_device("cpu") == "cpu"
    monkeypatch.setenv(D.DEVICE_ENV, "cpu")
    assert D.pick_device() == "cpu"
    with pytest.raises(ValueError, match="use auto, cpu, cuda"):
        D.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.pick_device("cuda")


@pytest.mark.gpu
def test_stages_put_their_models_on_the_reserved_gpu(tiny_bert_dir, tiny_llama_dir):
    """Where CUDA exists: the scoring actor, a local generator, the sentence encoder and the
    West-of-N actor's reward model load on the GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from mars_ray.generation import GenParams
    from mars_ray.generation.local import make_generator
    from mars_ray.stages.score import ScoreActor

    actor = ScoreActor(
        str(tiny_bert_dir),
        seed=0,
        dtype="auto",
        max_prompt_tokens=32,
        max_response_tokens=16,
        batch_size=4,
        num_threads=None,
        new_head=True,  # the backbone's new head: these check the stage, not the model
    )
    assert next(actor.model.parameters()).device.type == "cuda"
    gen = make_generator("local", str(tiny_llama_dir), GenParams(max_new_tokens=4), device=D.pick_device())
    assert next(gen.model.parameters()).device.type == "cuda"
    assert gen.generate(["hi"], 1)[0][0] is not None
    from mars_ray.stages.embed import Encoder

    enc = Encoder(str(tiny_bert_dir))
    assert enc.device.startswith("cuda") and enc.distances(["a b"], ["a c"]).shape == (1,)
    from mars_ray.config import Config
    from mars_ray.stages.west_of_n import WestOfNActor

    cfg = Config.load(overrides={"paraphrase.model": str(tiny_llama_dir), "paraphrase.max_new_tokens": "4"})
    import dataclasses

    won = WestOfNActor(
        dataclasses.asdict(cfg.paraphrase),
        n=2,
        reward_ref=str(tiny_bert_dir),
        seed=0,
        gen_seed=0,
        dtype="auto",
        max_prompt_tokens=32,
        max_response_tokens=16,
        batch_size=4,
        num_threads=None,
        cache_dir=None,
    )
    assert next(won.model.parameters()).device.type == "cuda"


_RESERVED_GPU_PROBE = """
import json, os, sys, ray
ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, logging_level="ERROR",
         runtime_env={"env_vars": json.loads(sys.argv[1])})

@ray.remote(num_gpus=1, num_cpus=0)
def probe():
    from mars_ray.runtime import pick_device
    try:
        return {"device": pick_device(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    except ValueError as e:
        return {"error": str(e), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

print("OUT" + json.dumps(ray.get(probe.remote())))
"""


def _probe(env_vars: dict[str, str]) -> dict:
    """pick_device inside a Ray task that reserved a GPU from a local Ray advertising one (this
    machine has none: Ray hands out the id, torch sees no CUDA)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in (D.DEVICE_ENV, "RAY_ADDRESS")}
    out = subprocess.run(
        [sys.executable, "-c", _RESERVED_GPU_PROBE, json.dumps(env_vars)],
        capture_output=True,
        text=True,
        env={**env, "RAY_AUTH_MODE": "disabled"},
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.split("OUT", 1)[1])


@pytest.mark.ray
def test_a_reserved_gpu_is_used_or_the_run_stops_never_a_silent_cpu():
    """Issue 39, defect 9: an actor that reserved a GPU used to fall back to the CPU when CUDA was
    unusable (a torch/driver mismatch); now it fails naming the node and the torch/CUDA build,
    unless the device is set to cpu on purpose (the simulated cluster)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA works here: the failure path needs a GPU Ray hands out but torch cannot use")
    failed = _probe({})
    assert failed["gpu_ids"] == ["0"]
    assert "reserved GPU(s)" in failed["error"] and "CUDA is not available on node" in failed["error"]
    assert f"torch {torch.__version__}" in failed["error"] and "resources.device cpu" in failed["error"]
    assert _probe({D.DEVICE_ENV: "cpu"}) == {"device": "cpu", "gpu_ids": ["0"]}


def test_cuda_ordinals_stay_in_the_driver_and_job_env_keeps_its_own_values(monkeypatch):
    """Defect 8: resources.device reaches a `ray job submit` run's workers (our env merged into
    the job's without a key both set, which Ray refuses), and cuda:N, a GPU of the driver's
    machine, becomes the worker's own reserved GPU (cuda) instead of an invalid ordinal."""
    import json

    monkeypatch.setenv(D.DEVICE_ENV, "cuda:3")
    assert D.worker_env()[D.DEVICE_ENV] == "cuda"
    monkeypatch.setenv(D.DEVICE_ENV, "cpu")
    assert D.worker_env()[D.DEVICE_ENV] == "cpu"
    job = {"runtime_env": {"env_vars": {"HF_HOME": "/mnt/shared/hf"}, "working_dir": "x"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    ours = {"HF_HOME": "/root/.cache", D.DEVICE_ENV: "cpu"}
    assert D._env_missing_from_job(ours) == {D.DEVICE_ENV: "cpu"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert D._env_missing_from_job(ours) == ours


def test_training_backend_is_gloo_where_the_workers_run_on_cpus(monkeypatch):
    monkeypatch.delenv(D.DEVICE_ENV, raising=False)
    assert D.torch_config(use_gpu=False).backend == "gloo"
    assert D.torch_config(use_gpu=True).backend == "nccl"
    assert D.torch_config(use_gpu=True, device="cpu").backend == "gloo"  # a simulated GPU cluster
    assert D.torch_config(use_gpu=True, backend="gloo").backend == "gloo"
    monkeypatch.setenv(D.DEVICE_ENV, "cpu")
    assert D.torch_config(use_gpu=True).backend == "gloo"


def test_placement_log_names_who_chose_which_device(tmp_path, monkeypatch):
    import json

    log = tmp_path / "placement.jsonl"
    monkeypatch.setenv(D.PLACEMENT_LOG_ENV, str(log))

    class Loader:
        def load(self):
            return D.pick_device("cpu")

    assert Loader().load() == "cpu"
    row = json.loads(log.read_text().splitlines()[-1])
    assert row["who"] == "Loader.load" and row["device"] == "cpu" and row["gpu_ids"] == []


def test_a_train_worker_sharing_its_nodes_gpus_uses_its_own():
    """Found on the simulated cluster: Ray Train gives every worker of a node the node's GPUs in
    CUDA_VISIBLE_DEVICES ("0,1"), so plain "cuda" put both workers on GPU 0."""
    assert D.reserved_device(["1"], "0,1") == "cuda:1"
    assert D.reserved_device(["0"], "0,1") == "cuda:0"
    assert D.reserved_device(["5"], "5") == "cuda"  # an actor: Ray shows it its own GPU only
    assert D.reserved_device(["3"], None) == "cuda"
