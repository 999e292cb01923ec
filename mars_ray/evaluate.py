"""`mars-ray eval`: a trained reward model on any preference data the data layer reads.

Writes ``DIR/eval.json`` (accuracy, SNR, n, reward statistics, accuracy by length, RewardBench
subsets and sections where the data has a ``subset`` column, the curvature diagnostic),
``DIR/eval.md`` + ``DIR/eval.html`` (a readable report) and PNG plots. On RewardBench data it also
writes ``DIR/rewardbench_results.json``, the per-subset results file RewardBench itself writes, so
its leaderboard tools read our numbers. RewardBench 2 files (N completions per prompt) are scored
the way RewardBench 2 scores them: best-of-N accuracy per subset, the Ties formula for Ties.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.core.atomic import atomic_path, write_json, write_jsonl, write_text
from mars_ray.core.losses import pair_metrics
from mars_ray.core.metrics import (
    SUBSET_SECTION,
    curvature_bins,
    length_buckets,
    rewardbench2_scores,
    rewardbench_results,
    rewardbench_sections,
    subset_accuracy,
)
from mars_ray.runtime import pick_device, placement

RESULTS_FILE = "rewardbench_results.json"


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
    from mars_ray.models.reward import Encoded, encode_preferences, score_with_features

    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_cfg = dataclasses.replace(cfg.data, val_fraction=0.0, test_fraction=0.0)  # every usable pair
    if _is_best_of_n(data_cfg):
        return evaluate_best_of_n(cfg, model_ref, log=log)
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
    model, tok = _load_model(cfg, ref)
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
        "ran_on": placement(str(next(model.parameters()).device)),
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
        if any(s in SUBSET_SECTION for s in per):
            rb_file = rewardbench_results(per, model=model_ref, chat_template=_chat_template_name(tok))
            write_json(out_dir / RESULTS_FILE, rb_file)
    else:
        result["sections"] = {}
    bins = min(cfg.eval.curvature_bins, n)
    result["curvature"] = curvature_bins(
        margins, feats[:n].astype(np.float64) - feats[n:].astype(np.float64), bins=bins
    )
    result["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    with atomic_path(out_dir / "scores.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, pair_id=np.array(table.column(S.PAIR_ID).to_pylist()), r_chosen=rc, r_rejected=rr)
    write_json(out_dir / "eval.json", result)
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


def _load_model(cfg: Config, ref: str) -> tuple[Any, Any]:
    """The reward model to evaluate, in eval mode, on the device the policy picks."""
    from mars_ray.models.reward import load_reward_model

    model, tok = load_reward_model(
        ref,
        seed=cfg.seed,
        dtype=cfg.model.dtype,
        device=pick_device(cfg.resources.device),
        cache_dir=cfg.model.cache_dir,
        offline=cfg.model.offline,
    )
    return model.eval(), tok


def _chat_template_name(tokenizer: Any) -> str | None:
    """RewardBench's ``chat_template`` field: "tokenizer" when the tokenizer's template formats the
    conversation, else null (a plain text pair)."""
    from mars_ray.models.reward import uses_chat_template

    return "tokenizer" if uses_chat_template(tokenizer) else None


def _is_best_of_n(data_cfg: Any) -> bool:
    """Whether the data is RewardBench 2's layout (``data.format rewardbench2`` or detected)."""
    if data_cfg.format == "rewardbench2":
        return True
    if data_cfg.format != "auto" or data_cfg.path.startswith("builtin:"):
        return False
    from mars_ray.data.files import iter_records
    from mars_ray.data.formats import detect_format
    from mars_ray.data.load import resolve_data_files

    for path in resolve_data_files(data_cfg):
        for rec in iter_records(path):
            if rec.row is not None and detect_format(rec.row) is not None:
                return detect_format(rec.row) == "rewardbench2"
    return False


def _best_of_n_row(row: dict[str, Any]) -> dict[str, Any]:
    """A validated RewardBench 2 row, or RowError naming the field."""
    from mars_ray.core.validation import RowError, text_problem

    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise RowError("prompt", "missing" if prompt is None else f"expected a string, got {type(prompt).__name__}")
    comps: dict[str, list[str]] = {}
    for name in ("chosen", "rejected"):
        v = row.get(name)
        if not isinstance(v, list) or not v:
            raise RowError(name, "expected a non-empty list of completions")
        for i, x in enumerate(v):
            why = text_problem(x)
            if why:
                raise RowError(f"{name}[{i}]", why)
        comps[name] = v
    subset = row.get("subset")
    if not isinstance(subset, str) or not subset:
        raise RowError("subset", "missing (RewardBench 2 rows name their subset)")
    rid = row.get("id")
    if rid is None:
        raise RowError("id", "missing")
    n_correct = row.get("num_correct", len(comps["chosen"]))
    if isinstance(n_correct, bool) or not isinstance(n_correct, int) or n_correct != len(comps["chosen"]):
        raise RowError("num_correct", f"{n_correct!r} does not match the {len(comps['chosen'])} chosen completions")
    total = row.get("total_completions")
    if total is not None and total != len(comps["chosen"]) + len(comps["rejected"]):
        raise RowError(
            "total_completions", f"{total!r} but the row has {len(comps['chosen']) + len(comps['rejected'])}"
        )
    return {
        "id": str(rid),
        "subset": subset,
        "prompt": prompt,
        "completions": comps["chosen"] + comps["rejected"],
        "num_correct": n_correct,
    }


def evaluate_best_of_n(cfg: Config, model_ref: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score a RewardBench 2 file: every completion of every row, then per subset the best-of-N
    accuracy (a row counts 1 when its chosen completion outscores the others, 1/k for a k-way tie at
    the top) or, for Ties, RewardBench 2's Ties score. Rows that are not usable are quarantined
    with their file, line, field and reason; ``rows_read == rows + quarantined``."""
    from mars_ray.core.validation import RowError
    from mars_ray.data.files import iter_records
    from mars_ray.data.load import resolve_data_files
    from mars_ray.models.reward import score_texts

    if cfg.eval.exclude_pairs:
        raise ValueError("eval.exclude_pairs applies to preference pairs; a RewardBench 2 file has none")
    t0 = time.perf_counter()
    out_dir = Path(cfg.output.dir)
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    read = 0
    for path in resolve_data_files(cfg.data):
        for rec in iter_records(path):
            read += 1
            try:
                if rec.error is not None:
                    raise rec.error
                rows.append({**_best_of_n_row(rec.row), "line": rec.line, "file": str(path)})
            except RowError as e:
                quarantine.append(
                    {"file": str(path), "line": rec.line, "field": e.field, "reason": e.reason, "raw": rec.raw}
                )
    if cfg.data.max_pairs is not None and len(rows) > cfg.data.max_pairs:
        rng = np.random.default_rng(cfg.data.seed if cfg.data.seed is not None else cfg.seed)
        keep = np.sort(rng.choice(len(rows), size=cfg.data.max_pairs, replace=False))
        rows = [rows[i] for i in keep]
    if not rows:
        raise ValueError(f"{cfg.data.path}: no usable RewardBench 2 rows (read {read}, {len(quarantine)} quarantined)")
    log(f"eval: {len(rows)} best-of-N rows from {cfg.data.path} ({len(quarantine)} quarantined)")
    ref = model_path(model_ref)
    model, tok = _load_model(cfg, ref)
    prompts = [r["prompt"] for r in rows for _ in r["completions"]]
    texts = [c for r in rows for c in r["completions"]]
    t1 = time.perf_counter()
    scores = score_texts(
        model,
        tok,
        prompts,
        texts,
        batch_size=cfg.eval.batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.data.max_response_tokens,
    )
    score_s = time.perf_counter() - t1
    k = 0
    for r in rows:
        r["scores"] = [float(x) for x in scores[k : k + len(r["completions"])]]
        k += len(r["completions"])
    rb2 = rewardbench2_scores(rows)
    result: dict[str, Any] = {
        "model": model_ref,
        "model_path": ref,
        "data": cfg.data.path,
        "format": "rewardbench2",
        "n": len(rows),
        "completions": len(texts),
        "rows_read": read,
        "quarantined": len(quarantine),
        "subsets": rb2["subsets"],
        "rewardbench2_average": rb2["average"],
        "accuracy": rb2["average"],
        "sections": {},
        "seconds": {"score": round(score_s, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("file", "line", "id", "subset", "num_correct", "scores")
    write_jsonl(out_dir / "best_of_n_scores.jsonl", ({k: r[k] for k in keys} for r in rows))
    if quarantine:
        from mars_ray.data.load import write_quarantine

        write_quarantine(quarantine, out_dir / "quarantine.jsonl")
    write_json(
        out_dir / RESULTS_FILE,
        rewardbench_results(rb2["subsets"], model=model_ref, chat_template=_chat_template_name(tok)),
    )
    write_json(out_dir / "eval.json", result)
    lines = ["# RewardBench 2", "", f"Model `{model_ref}`, {len(rows)} rows, {len(texts)} completions.", ""]
    lines += ["| subset | rows | score |", "|---|---|---|"]
    lines += [f"| {s} | {v['n']} | {v['score']:.4f} |" for s, v in rb2["subsets"].items()]
    lines += ["", f"Average over the subsets: {rb2['average']:.4f}", ""]
    write_text(out_dir / "eval.md", "\n".join(lines))
    log(
        "eval: RewardBench 2 "
        + ", ".join(f"{s} {v['score']:.3f}" for s, v in rb2["subsets"].items())
        + f"; average {rb2['average']:.4f}; {out_dir}/eval.json"
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
