"""`mars-ray eval`: a trained reward model on any preference data the data layer reads.

Writes ``DIR/eval.json`` (accuracy, SNR, n, reward statistics, accuracy by length, RewardBench
subsets and sections where the data has a ``subset`` column, the curvature diagnostic),
``DIR/eval.md`` + ``DIR/eval.html`` (a readable report) and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.core.jsonable import json_default
from mars_ray.core.losses import pair_metrics
from mars_ray.core.metrics import curvature_bins, length_buckets, rewardbench_sections, subset_accuracy


def model_path(ref: str) -> str:
    """A run directory means its final model (``RUN/model``); anything else is passed on to the
    model resolver (HF folder, hub id, ``builtin:NAME``)."""
    p = Path(ref)
    if p.is_dir() and (p / "model" / "config.json").exists() and not (p / "config.json").exists():
        return str(p / "model")
    return ref


def evaluate(cfg: Config, model_ref: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every usable pair of ``cfg.data`` with ``model_ref``; write the outputs to
    ``cfg.output.dir``; return the eval.json content."""
    from mars_ray.data import read_preferences
    from mars_ray.models.reward import Encoded, encode_preferences, load_reward_model, score_with_features

    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_cfg = dataclasses.replace(cfg.data, val_fraction=0.0, test_fraction=0.0)  # every usable pair
    loaded = read_preferences(data_cfg, seed=cfg.seed)
    table = loaded.table
    excluded = 0
    if cfg.eval.exclude_pairs:
        table, excluded = _exclude(table, cfg.eval.exclude_pairs)
    n = table.num_rows
    log(
        f"eval: {n} pairs from {cfg.data.path} ({len(loaded.quarantine)} quarantined"
        + (f", {excluded} left out: in {cfg.eval.exclude_pairs}" if cfg.eval.exclude_pairs else "")
        + ")"
    )
    if n == 0:
        raise ValueError(f"{cfg.data.path}: no usable pairs to evaluate")
    ref = model_path(model_ref)
    model, tok = load_reward_model(
        ref, seed=cfg.seed, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir, offline=cfg.model.offline
    )
    model.eval()
    prompts, chosen, rejected = (table.column(c).to_pylist() for c in (S.PROMPT, S.CHOSEN, S.REJECTED))
    enc_c, enc_r = encode_preferences(
        tok,
        prompts,
        chosen,
        rejected,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
    )
    both = Encoded(
        enc_c.input_ids + enc_r.input_ids,
        (enc_c.token_type_ids + enc_r.token_type_ids) if enc_c.token_type_ids is not None else None,
        enc_c.prompt_truncated + enc_r.prompt_truncated,
        enc_c.response_truncated + enc_r.response_truncated,
    )
    t1 = time.perf_counter()
    rewards, feats = score_with_features(model, tok, both, batch_size=cfg.eval.batch_size)
    score_s = time.perf_counter() - t1
    rc, rr = rewards[:n], rewards[n:]
    margins = (rc - rr).astype(np.float64)
    correct = margins > 0
    metrics = pair_metrics(rc, rr)
    pair_len = np.maximum(enc_c.lengths, enc_r.lengths)
    result: dict[str, Any] = {
        "model": model_ref,
        "model_path": ref,
        "data": cfg.data.path,
        "n": n,
        "accuracy": metrics["accuracy"],
        "snr": metrics["snr"],
        "metrics": metrics,
        "by_length": length_buckets(correct, pair_len, cfg.eval.length_edges),
        "quarantined": len(loaded.quarantine),
        "excluded": excluded,
        "excluded_from": cfg.eval.exclude_pairs,
        "prompts_cut": int(enc_c.prompt_truncated),
        "responses_cut": int(enc_c.response_truncated + enc_r.response_truncated),
        "seconds": {"score": round(score_s, 3)},
    }
    subsets = [s or "" for s in table.column(S.SUBSET).to_pylist()]
    if any(subsets):
        labelled = [i for i, s in enumerate(subsets) if s]
        per = subset_accuracy(correct[labelled], [subsets[i] for i in labelled])
        rb = rewardbench_sections(per)
        result.update(
            subsets=per,
            sections=rb["sections"],
            sections_average=rb["average"],
            sections_covered=rb["covered"],
            sections_complete=rb["complete"],
            unknown_subsets=rb["unknown_subsets"],
        )
    else:
        result["sections"] = {}
    bins = min(cfg.eval.curvature_bins, n)
    result["curvature"] = curvature_bins(
        margins, feats[:n].astype(np.float64) - feats[n:].astype(np.float64), bins=bins
    )
    result["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    np.savez_compressed(
        out_dir / "scores.npz", pair_id=np.array(table.column(S.PAIR_ID).to_pylist()), r_chosen=rc, r_rejected=rr
    )
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    from mars_ray.report import eval_report

    eval_report(result, margins, out_dir)
    log(
        f"eval: accuracy {result['accuracy']:.4f}, snr {result['snr']:.4f}, n {n}"
        + (
            f", sections {', '.join(f'{k} {v:.3f}' for k, v in result['sections'].items())}"
            if result["sections"]
            else ""
        )
        + f"; {out_dir}/eval.json"
    )
    return result


def _exclude(table, ref: str):
    """``table`` without the pairs of ``ref`` (a run directory or a parquet file with pair ids)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    p = Path(ref)
    path = p / "data" / "pairs.parquet" if p.is_dir() else p
    if not path.is_file():
        raise ValueError(
            f"eval.exclude_pairs={ref}: no {path} (give a training run directory or a parquet file with pair_id)"
        )
    ids = pq.read_table(path, columns=[S.PAIR_ID]).column(S.PAIR_ID)
    keep = pc.invert(pc.is_in(table.column(S.PAIR_ID), value_set=ids))
    out = table.filter(keep)
    return out, table.num_rows - out.num_rows
