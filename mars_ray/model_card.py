"""A saved reward model describes itself: ``README.md`` (a Hugging Face model card) and the reward
statistics in ``config.json`` (OpenRLHF's ``mean``/``std`` keys), so the folder loads and makes
sense in other tools without mars_ray.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.core.atomic import write_text
from mars_ray.models.reward_stats import read_reward_statistics, reward_statistics, store_reward_statistics

__all__ = [
    "push",
    "read_reward_statistics",
    "render_card",
    "reward_statistics",
    "store_reward_statistics",
    "write_card",
]

CARD_FILE = "README.md"
CONFIG_COPY = "mars_ray_config.yaml"  # the run's resolved config, beside the weights
TAGS = ("reward-model", "mars", "mars-ray")
# Built-in models and the hub ids they ship.
BUILTIN_HUB_IDS = {
    "builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "builtin:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def base_model_id(ref: str) -> str:
    return BUILTIN_HUB_IDS.get(ref, ref)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "–" if not np.isfinite(v) else f"{v:.{digits}f}"
    return "–" if v is None else str(v)


def render_card(
    *,
    base_model: str,
    strategy: str,
    epochs: int,
    budget: int,
    data_files: Sequence[str],
    data_report: Mapping[str, Any],
    operations: Mapping[str, int],
    human_pairs: int,
    final: Mapping[str, Any],
    base: Mapping[str, Any] | None,
    stats: Mapping[str, float] | None,
    config_hash: str,
    chat_template: bool,
    decoder: bool = False,
) -> str:
    """The model card text: YAML front matter (what the hub indexes) and a readable body."""
    hub_base = base_model_id(base_model)
    front = ["---", "library_name: transformers", "pipeline_tag: text-classification"]
    if "/" in hub_base and not Path(hub_base).exists():
        front.append(f"base_model: {hub_base}")
    front += ["tags:", *[f"- {t}" for t in TAGS], "---", ""]
    synthetic = sum(operations.values())
    total = human_pairs + synthetic
    splits = data_report.get("splits", {})
    lines = [
        f"# Reward model trained with mars_ray ({strategy})",
        "",
        f"A Bradley-Terry reward model r(prompt, response) → scalar, fine-tuned from `{hub_base}` by "
        f"mars_ray (MARS data augmentation on Ray) with the `{strategy}` strategy: {epochs} epoch(s), a budget of "
        f"{budget} synthetic pairs per epoch. One logit; higher means preferred.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(MODEL_DIR)",
        "model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR).eval()",
    ]
    if chat_template:
        lines += [
            "text = tok.apply_chat_template([{'role': 'user', 'content': prompt},",
            "                                {'role': 'assistant', 'content': response}], tokenize=False)",
            "inputs = tok(text, add_special_tokens=False, return_tensors='pt')",
        ]
    else:
        lines.append("inputs = tok(prompt, response, truncation=True, return_tensors='pt')")
    lines += [
        "with torch.no_grad():",
        "    reward = model(**inputs).logits[0, 0].item()",
        "```",
        "",
        "Pairs were formatted "
        + (
            "with the tokenizer's chat template (the prompt's turns, then the response as the assistant turn)."
            if chat_template
            else "as a text pair (prompt, response) with the tokenizer's own special tokens."
        ),
    ]
    if stats:
        lines += [
            "",
            f"Reward statistics on the {stats['n_pairs']} human training pairs (chosen and rejected pooled): "
            f"mean {stats['mean']:.4f}, std {stats['std']:.4f}, stored in `config.json` as `mean` and `std` "
            "(OpenRLHF's keys); `mars-ray serve --serve.normalize true` uses them.",
        ]
    lines += ["", *_loaders(decoder)]
    lines += [
        "",
        "## Training data",
        "",
        "| file |",
        "|---|",
        *[f"| `{f}` |" for f in data_files],
        "",
        f"Rows read {data_report.get('read', '–')}, kept {data_report.get('kept', '–')}, quarantined "
        f"{data_report.get('quarantined', '–')} (with reasons in the run's `data/quarantine.jsonl`); splits: "
        + ", ".join(f"{k} {v}" for k, v in splits.items())
        + ".",
        "",
        "| training pairs in the last epoch | count | share |",
        "|---|---|---|",
        f"| human | {human_pairs} | {human_pairs / total:.1%} |" if total else "| human | 0 | – |",
    ]
    for op, n in sorted(operations.items(), key=lambda kv: -kv[1]):
        lines.append(f"| synthetic: {op} | {n} | {n / total:.1%} |")
    if final.get("precision"):
        lines += [
            "",
            "## Training",
            "",
            f"Precision: {final['precision']} ({final.get('precision_reason') or 'reason not recorded'}). The "
            "weights are saved in fp32; the reward head computes in fp32 in every precision.",
        ]
        if final.get("synthetic_weight") not in (None, 1.0):
            lines.append(
                f"Synthetic pairs had loss weight {final['synthetic_weight']:g} relative to human pairs "
                "(`train.synthetic_weight`; the weights scaled to mean 1)."
            )
    lines += [
        "",
        "## Held-out metrics (the run's test split)",
        "",
        "| metric | before training | final |",
        "|---|---|---|",
    ]
    for key in ("accuracy", "snr", "margin_mean"):
        lines.append(f"| {key} | {_fmt((base or {}).get('test_' + key))} | {_fmt(final.get('test_' + key))} |")
    lines += [
        "",
        f"Validation accuracy {_fmt(final.get('val_accuracy'))} ({_fmt(final.get('val_n'))} pairs).",
        "",
        "## Reproduce",
        "",
        f"The run's resolved configuration is `{CONFIG_COPY}` in this folder (config hash `{config_hash}`):",
        "",
        "```bash",
        f"mars-ray train --config {CONFIG_COPY} --output.dir RUN_DIR",
        "```",
        "",
    ]
    return "\n".join(front + lines)


def write_card(model_dir: str | os.PathLike, text: str, config_yaml: str | None = None) -> Path:
    out = Path(model_dir)
    write_text(out / CARD_FILE, text)
    if config_yaml is not None:
        write_text(out / CONFIG_COPY, config_yaml)
    return out / CARD_FILE


def _unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a network failure: no route, DNS, refused, timeout."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if isinstance(cur, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def push(model_dir: str | os.PathLike, repo: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a model folder to the Hugging Face hub; the URL of the commit.

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
        ConnectionError: the hub cannot be reached (says so plainly).
    """
    from huggingface_hub import HfApi

    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: no config.json; give a saved model folder (a run's model/)")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        raise ConnectionError(f"HF_HUB_OFFLINE is set: nothing was uploaded to {endpoint}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(d), repo_id=repo, repo_type="model", commit_message="mars-ray push")
    except Exception as e:
        if _unreachable(e):
            raise ConnectionError(
                f"the Hugging Face hub at {endpoint} cannot be reached ({type(e).__name__}: {e}); nothing was "
                f"uploaded. {d} is complete as it is: copy it, or push from a machine with access."
            ) from None
        raise
    return str(getattr(info, "commit_url", info))


def _loaders(decoder: bool) -> list[str]:
    """Which frameworks load this folder as a reward model (each claim is tested:
    tests/test_model_card.py loads a saved folder the way that framework does)."""
    head = "`score` (one output, no bias)" if decoder else "`classifier` on the pooled first token"
    lines = [
        "## Loading it elsewhere",
        "",
        f"The weights are a plain `AutoModelForSequenceClassification` folder with one label; the head is {head}.",
        "",
        "- **TRL**: `RewardTrainer` and GRPO/RLOO's model reward functions load it as it is "
        "(`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`).",
        "- **mars_ray**: `mars-ray serve --model PATH` (HTTP `/score`, OpenRLHF's `/get_reward`, vLLM-style "
        "`/classify`), `mars-ray eval`.",
    ]
    if decoder:
        lines += [
            '- **OpenRLHF**: `get_llm_for_sequence_regression(path, "reward", value_head_prefix="score")`; '
            "it reads the reward at the last token of the attention mask (transformers at the last non-pad token: "
            "the same token unless the text ends with a pad-equal EOS).",
            "- **verl**: through the server (`mars_ray.serve.verl_reward.compute_score` as its custom reward "
            "function, or its vLLM reward-model path pointed at `/classify`).",
        ]
    else:
        lines += [
            "- **OpenRLHF and verl** do not load encoder (BERT-style) reward models as such: OpenRLHF reads the "
            "score at the last token and needs an EOS token, which BERT tokenizers lack. Serve it (`mars-ray serve`) "
            "and call `/get_reward` (OpenRLHF) or `compute_score` (verl) instead.",
        ]
    return lines
