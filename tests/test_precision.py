"""The precision policy (mars_ray/models/precision.py): bf16 where it is native, fp32 elsewhere, the
reward head in fp32 always; what a training run and its model record about it.

The CPU flags are read from a file named by MARS_RAY_CPUINFO, so both kinds of machine are tested
here whatever this one is: a CPU with AVX512-BF16 and an AVX2-only CPU (real /proc/cpuinfo lines).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray.config import Config
from mars_ray.models import precision as P

SAPPHIRE = (
    "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
)
ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AVX2 = "model name\t: AMD EPYC 7R13 Processor\nflags\t\t: fpu sse sse4_2 avx avx2 fma\n"
CASCADE = "model name\t: Intel(R) Xeon(R) Platinum 8259CL\nflags\t\t: avx2 avx512f avx512bw avx512vl avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n"


@pytest.fixture
def cpu(tmp_path, monkeypatch):
    """Point the policy at a CPU's flags."""

    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setenv(P.CPU_FLAGS_ENV, str(path))

    return use


def test_cpu_flags_decide_native_bf16():
    assert P.cpu_bf16_support(SAPPHIRE) == (True, "CPU with AMX (Intel(R) Xeon(R) Platinum 8488C)")
    assert P.cpu_bf16_support(ZEN4)[0] and "AVX512-BF16" in P.cpu_bf16_support(ZEN4)[1]
    assert P.cpu_bf16_support(GRAVITON3)[0] and "Arm" in P.cpu_bf16_support(GRAVITON3)[1]
    # AVX-512 without the bf16 instructions (Cascade Lake) and AVX2 only: emulated, so not native
    for text in (AVX2, CASCADE):
        ok, why = P.cpu_bf16_support(text)
        assert not ok and "without bf16 instructions" in why
    assert P.cpu_bf16_support("") == (False, "no CPU flags found: bf16 not assumed")


def test_auto_is_bf16_where_native_and_fp32_elsewhere(cpu):
    cpu(ZEN4)
    p = P.resolve_precision("auto", "cpu")
    assert p.bf16 and p.device_type == "cpu" and "AVX512-BF16" in p.reason
    assert P.inference_dtype("auto") == torch.bfloat16 and P.native_bf16("cpu")
    cpu(AVX2)
    p = P.resolve_precision("auto", "cpu")
    assert p.compute == "fp32" and "without bf16 instructions" in p.reason
    assert P.inference_dtype("auto") == torch.float32 and not P.native_bf16("cpu")
    # forced settings are taken as asked; bf16 where it is not native says so
    assert P.resolve_precision("fp32", "cpu").compute == "fp32"
    forced = P.resolve_precision("bf16", "cpu")
    assert forced.bf16 and "emulated" in forced.reason
    assert P.inference_dtype("float32") == torch.float32 and P.inference_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        P.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        P.inference_dtype("float8")


def test_the_policy_reads_this_machines_flags():
    """No file given: /proc/cpuinfo decides, and the answer agrees with its flags."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {w for line in text.splitlines() if line.startswith(("flags", "Features")) for w in line.split()}
    native = bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    assert P.native_bf16("cpu") == (native and torch.backends.mkldnn.is_available())


def test_fp32_head_under_autocast_keeps_the_reward_in_fp32(tiny_bert_dir):
    from mars_ray.models.reward import load_reward_model

    model, _ = load_reward_model(str(tiny_bert_dir), seed=0, dtype="float32", new_head=True)
    head = P.final_projection(model)
    assert type(head).__name__ == "Fp32Linear" and isinstance(head, torch.nn.Linear)
    x = torch.randn(4, head.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ head.weight.T + head.bias, rtol=0, atol=1e-6)
    # a plain Linear under autocast gives a bf16 reward: 8 significant bits
    plain = torch.nn.Linear(head.in_features, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(x).dtype == torch.bfloat16
    # the class swap survives a deep copy (LoRA merging copies the model) and keeps parameter names
    import copy

    assert type(P.final_projection(copy.deepcopy(model))) is type(head)
    assert "classifier.weight" in dict(model.named_parameters())


def test_bf16_inference_keeps_the_saved_head_exact_and_margins_close(tiny_bert_dir, tmp_path):
    """A saved (fp32) model loaded in bf16: body bf16, head the saved fp32 values bit for bit, and
    the margins correlate with fp32's."""
    from mars_ray.models.reward import load_reward_model, score_pairs

    m32, tok = load_reward_model(str(tiny_bert_dir), seed=3, dtype="float32", new_head=True)
    with torch.no_grad():  # a head that is not a fresh initialisation
        m32.classifier.weight.mul_(7.0).add_(1e-3)
    m32.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    a, _ = load_reward_model(str(tmp_path / "m"), seed=0, dtype="float32")
    b, _ = load_reward_model(str(tmp_path / "m"), seed=0, dtype="bfloat16")
    assert b.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    assert b.classifier.weight.dtype == torch.float32
    assert torch.equal(a.classifier.weight, b.classifier.weight) and torch.equal(a.classifier.bias, b.classifier.bias)
    rng = np.random.default_rng(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "it",
        "rained",
        "over",
        "hills",
        "and",
        "rivers",
        "far",
        "away",
    ]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(4, 30)))) for _ in range(96)]
    p, c, r = texts[:32], texts[32:64], texts[64:]
    kw = dict(batch_size=8, max_prompt_tokens=32, max_response_tokens=32)
    ca, ra = score_pairs(a, tok, p, c, r, **kw)
    cb, rb = score_pairs(b, tok, p, c, r, **kw)
    assert cb.dtype == np.float32
    # bf16 rounds the body's activations (8 significant bits): rewards within a few % of fp32's.
    # (This random tiny model's margins are near zero, so the margin correlation is checked on
    # trained MiniLM and real pairs: benchmarks/precision_accuracy.py.)
    scale = float(np.abs(np.concatenate([ca, ra])).max())
    assert float(np.abs(np.concatenate([cb - ca, rb - ra])).max()) < 0.05 * scale


def _fit(tiny_bert_dir, tmp_path, precision: str, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mars_ray.core.schema import PAIR_SCHEMA, human_row
    from mars_ray.train import FitSpec, fit_reward_model

    rows = [
        human_row(
            prompt=f"question {i} about topic {i % 5}", chosen=f"good answer {i} yes", rejected=f"bad reply {i} no"
        )
        for i in range(48)
    ]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    cfg = Config.load(
        overrides={
            "seed": 0,
            "train.lr": 5e-2,
            "train.batch_size": 8,
            "train.passes": 3,
            "train.lora": True,
            "train.lora_r": 8,
            "train.lora_alpha": 16,
            "train.lora_dropout": 0.0,
            "train.num_workers": 0,
            "train.precision": precision,
            "data.max_prompt_tokens": 24,
            "data.max_response_tokens": 16,
        }
    )
    return fit_reward_model(
        cfg, FitSpec(init_model=str(tiny_bert_dir), train_path=path, val_path=path, run_dir=tmp_path / name, name=name)
    ), path


def test_bf16_training_learns_records_its_precision_and_saves_fp32(tiny_bert_dir, tmp_path, cpu):
    """Mixed precision on a CPU that has bf16 (the flags say so): it learns as fp32 does, the
    metrics say bf16 and why, the saved weights are fp32 and score the pairs as the loop did."""
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from mars_ray.models.reward import load_reward_model, score_pairs

    cpu(ZEN4)
    m, path = _fit(tiny_bert_dir, tmp_path, "auto", "bf16")
    assert m["precision"] == "bf16" and "AVX512-BF16" in m["precision_reason"]
    hist = m["train_loss_history"]
    assert np.mean(hist[-4:]) < np.mean(hist[:4]) - 0.05, hist
    assert m["val_accuracy"] >= 0.75, m
    with safe_open(str(Path(m["model_dir"]) / "model.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}  # noqa: SIM118 (safe_open is not iterable)
    model, tok = load_reward_model(m["model_dir"], dtype="float32")
    t = pq.read_table(path).to_pydict()
    rc, rr = score_pairs(
        model, tok, t["prompt"], t["chosen"], t["rejected"], batch_size=16, max_prompt_tokens=24, max_response_tokens=16
    )
    # fp32 scores of the saved model against the loop's bf16 validation: same ranking of the pairs
    assert float(np.mean(rc > rr)) == pytest.approx(m["val_accuracy"], abs=2 / 48)
    assert float(np.mean(rc - rr)) == pytest.approx(m["val_margin_mean"], rel=0.05)
    # the same run on a CPU without bf16: fp32, and it says why
    cpu(AVX2)
    m32, _ = _fit(tiny_bert_dir, tmp_path, "auto", "fp32")
    assert m32["precision"] == "fp32" and "without bf16 instructions" in m32["precision_reason"]
    assert m32["val_accuracy"] >= 0.75


def test_legacy_precision_keys_are_read_as_what_they_ran(tmp_path):
    y = tmp_path / "old.yaml"
    y.write_text("train:\n  bf16_autocast: true\n")
    with pytest.warns(FutureWarning, match="replaced by train.precision"):
        assert Config.load(y).train.precision == "bf16"
    y.write_text("train:\n  bf16_autocast: false\ndeepspeed:\n  enabled: true\n  bf16: true\n")
    with pytest.warns(FutureWarning, match="deepspeed.bf16"):
        assert Config.load(y).train.precision == "bf16"  # a DeepSpeed run followed deepspeed.bf16
    y.write_text("train:\n  bf16_autocast: false\n")
    with pytest.warns(FutureWarning):
        assert Config.load(y).train.precision == "fp32"
    with pytest.warns(FutureWarning):
        assert Config.load(overrides={"train.bf16_autocast": "true"}).train.precision == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.load().train.precision == "auto" and Config().model.dtype == "auto"


def test_encoder_vectors_of_each_dtype_are_cached_apart(tiny_bert_dir, tmp_path):
    from mars_ray.stages.embed import Encoder

    e32 = Encoder(str(tiny_bert_dir), dtype="float32", cache_dir=str(tmp_path), cache=True)
    e16 = Encoder(str(tiny_bert_dir), dtype="bfloat16", cache_dir=str(tmp_path), cache=True)
    # the fp32 key is the one earlier versions wrote (their caches stay valid)
    import hashlib

    assert e32._key("x") == hashlib.sha256(f"embed\0{tiny_bert_dir}\0x".encode()).hexdigest()
    assert e16._key("x") != e32._key("x")
    texts = ["water is wet", "grass is green", "the sky is blue"]
    v32, v16 = e32.embed(texts), e16.embed(texts)
    assert e16.stats == {"hits": 0, "encoded": 3}  # not served the fp32 vectors
    assert v16.dtype == np.float32 and float(np.abs(v32 - v16).max()) < 0.05


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_on_a_cpu_with_bf16_trains_and_saves_fp32_weights(
    ray_local, tiny_bert_dir, tmp_path, cpu, stage
):
    """DeepSpeed ZeRO-2 under the policy's bf16 (its bf16 section: bf16 weights in the engine, fp32
    master weights in its optimizer): it trains, says bf16, and the saved folder holds the fp32
    master weights, which score the validation pairs as the engine did."""
    pytest.importorskip("deepspeed")
    from safetensors import safe_open

    from mars_ray.models.reward import load_reward_model, score_pairs

    cpu(ZEN4)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mars_ray.core.schema import PAIR_SCHEMA, human_row
    from mars_ray.train import FitSpec, fit_reward_model

    rows = [
        human_row(
            prompt=f"question {i} about topic {i % 5}", chosen=f"good answer {i} yes", rejected=f"bad reply {i} no"
        )
        for i in range(32)
    ]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    over = {
        "seed": 0,
        "train.lr": 5e-2,
        "train.batch_size": 8,
        "train.passes": 2,
        "train.lora": False,
        "train.num_workers": 1,
        "train.precision": "auto",
        "deepspeed.enabled": True,
        "deepspeed.stage": stage,
        "data.max_prompt_tokens": 24,
        "data.max_response_tokens": 16,
    }
    m = fit_reward_model(
        Config.load(overrides=over),
        FitSpec(init_model=str(tiny_bert_dir), train_path=path, val_path=path, run_dir=tmp_path / "ds", name="ds"),
    )
    assert m["precision"] == "bf16" and m["steps"] == 8
    with safe_open(str(Path(m["model_dir"]) / "model.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}  # noqa: SIM118
    model, tok = load_reward_model(m["model_dir"], dtype="float32")
    t = pq.read_table(path).to_pydict()
    rc, rr = score_pairs(
        model, tok, t["prompt"], t["chosen"], t["rejected"], batch_size=16, max_prompt_tokens=24, max_response_tokens=16
    )
    assert float(np.mean(rc > rr)) == pytest.approx(m["val_accuracy"], abs=2 / 32)
