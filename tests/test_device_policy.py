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
