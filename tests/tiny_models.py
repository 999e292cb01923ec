"""Tiny real models built from configs (random weights, real tokenizers), saved as HF folders.

They load through the same code paths as real models, in well under a second, so most tests use
them; the real MiniLM / SmolLM2 are used only in tests marked ``slow``.
"""

from __future__ import annotations

from pathlib import Path


def tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer (vocab 30522): encoder or reward backbone."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mars_ray.models import minilm_path

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer and chat template: a tiny chat model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mars_ray.models import resolve_model

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2").path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_reward_model(backbone: Path, path: Path, seed: int = 0) -> Path:
    """``backbone`` (a tiny model above) with a seeded reward head, saved as a reward model folder
    (``...ForSequenceClassification``, one label): what serving and evaluation load."""
    from mars_ray.models.reward import load_reward_model

    if (path / "config.json").exists():
        return path
    model, tok = load_reward_model(str(backbone), seed=seed, dtype="float32", new_head=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
