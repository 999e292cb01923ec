"""Read preference data into one Arrow table, quarantining every row that cannot be used.

``read_preferences`` is the single entry point every command uses::

    result = read_preferences(cfg.data, seed=cfg.seed)
    result.table        # pyarrow.Table with mars_ray.core.schema.PAIR_SCHEMA, split column set
    result.quarantine   # one dict per bad row: file, line, field, reason, raw
    result.report       # counts that add up: read == kept + quarantined (+ per-split counts)

``to_ray_dataset`` turns the table into a Ray Dataset for the streaming stages.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.config import DataConfig
from mars_ray.core import schema as S
from mars_ray.core.splits import SPLITS, assign_splits, select_subset
from mars_ray.core.validation import RowError, pair_problems
from mars_ray.data.files import DataFileError, Record, iter_records
from mars_ray.data.formats import PARSERS, detect_format, make_generic, meta_json

BUILTIN_DATASETS = {"builtin:demo": "demo.jsonl"}


@dataclass
class LoadResult:
    table: pa.Table
    quarantine: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


def builtin_path(name: str) -> Path:
    """Path of a dataset shipped inside the package (``builtin:demo``).

    Raises:
        DataFileError: unknown built-in name.
    """
    if name not in BUILTIN_DATASETS:
        raise DataFileError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    return Path(__file__).parent / "builtin" / BUILTIN_DATASETS[name]


def resolve_data_files(cfg: DataConfig) -> list[Path]:
    """Local files behind ``data.path``: a file, a built-in name, or a Hugging Face dataset id.

    Raises:
        DataFileError: nothing usable at that path, or a hub id that cannot be fetched.
    """
    ref = cfg.path
    if ref.startswith("builtin:"):
        return [builtin_path(ref)]
    p = Path(os.path.expanduser(ref))
    if p.exists():
        return [p]
    if ref.startswith(("./", "/", "~", "../")) or p.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"}:
        raise DataFileError(f"{ref}: file not found")
    return _hub_dataset_files(ref, cfg)


def _hub_dataset_files(repo_id: str, cfg: DataConfig) -> list[Path]:
    """Download (or find in the local cache) the data files of a hub dataset's split."""
    if repo_id.count("/") != 1:
        raise DataFileError(
            f"{repo_id}: not a file, a built-in dataset (builtin:demo) or a Hugging Face dataset id (org/name)"
        )
    from huggingface_hub import snapshot_download

    split = cfg.hf_split
    patterns = [f"*{split}*.jsonl", f"*{split}*.parquet", f"*{split}*.json", f"*{split}*.csv"]
    if cfg.hf_name:
        patterns = [f"{cfg.hf_name}/{pat}" for pat in patterns] + [f"*/{cfg.hf_name}/{pat}" for pat in patterns]
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, auth: all reported the same way
        raise DataFileError(
            f"{repo_id}: cannot fetch this Hugging Face dataset ({type(e).__name__}: {e}). "
            "Download it where the hub is reachable and pass the file with --data.path, "
            "or use --data.path builtin:demo"
        ) from None
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in {".jsonl", ".parquet", ".json", ".csv"})
    if not files:
        raise DataFileError(f"{repo_id}: no data files for split {split!r} (set data.hf_split / data.hf_name)")
    return files


def read_preferences(cfg: DataConfig, *, seed: int) -> LoadResult:
    """Read, validate, deduplicate, subset and split ``cfg.path``.

    Raises:
        DataFileError: a file is unusable as a whole (missing, undetectable format, or more than
            ``cfg.max_bad_fraction`` of its rows quarantined, with the commonest reasons named).
    """
    t0 = time.perf_counter()
    if cfg.seed is not None:
        seed = cfg.seed
    files = resolve_data_files(cfg)
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    read = 0
    seen: dict[str, tuple[str, int]] = {}
    formats: dict[str, str] = {}
    for path in files:
        label = str(path) if not cfg.path.startswith("builtin:") else cfg.path
        n_before, q_before = read, len(quarantine)
        fmt = _detect(path, label) if cfg.format == "auto" else cfg.format
        parser = make_generic(cfg.columns) if fmt == "generic" else PARSERS[fmt]
        for rec in iter_records(path):
            read += 1
            row, err = _to_row(rec, parser, cfg, label)
            if err is not None:
                quarantine.append(_quarantine(label, rec, err))
                continue
            dup = seen.get(row[S.PAIR_ID])
            if dup is not None:
                q = _quarantine(label, rec, RowError("<row>", "duplicate pair"))
                q["duplicate_of"] = {"file": dup[0], "line": dup[1]}
                quarantine.append(q)
                continue
            seen[row[S.PAIR_ID]] = (label, rec.line)
            rows.append(row)
        formats[label] = fmt
        _check_bad_fraction(label, read - n_before, quarantine[q_before:], cfg.max_bad_fraction)
    if not rows:
        raise DataFileError(f"{cfg.path}: no usable preference pairs (read {read}, all quarantined)")
    table = _finish(rows, cfg, seed)
    report = _report(read, table, quarantine, formats, files, cfg, time.perf_counter() - t0)
    return LoadResult(table, quarantine, report)


def _detect(path: Path, label: str, scan: int = 1000) -> str:
    """The reader for a file, from the first of its first ``scan`` rows whose fields fit one."""
    first = None
    n = 0
    for n, rec in enumerate(iter_records(path), start=1):
        if n > scan:
            break
        if rec.row is None:
            continue
        fmt = detect_format(rec.row)
        if fmt is not None:
            return fmt
        first = first or rec
    if n == 0:
        raise DataFileError(f"{label}: no rows")
    if first is None:
        return "pairs"  # no row parses at all: each is quarantined with its own reason
    where = f"line {first.line}'s fields {sorted(first.row)[:12]}"
    raise DataFileError(
        f"{label}: cannot tell the format from {where}; "
        "set --data.format (pairs, hh-rlhf, pku-saferlhf, ultrafeedback, rewardbench) or "
        "--data.format generic with --data.columns '{prompt: ..., chosen: ..., rejected: ...}'"
    )


def _to_row(rec: Record, parser, cfg: DataConfig, label: str) -> tuple[dict | None, RowError | None]:
    if rec.error is not None:
        return None, rec.error
    try:
        parsed = parser(rec.row, pku_label=cfg.pku_label)
    except RowError as e:
        return None, e
    problems = pair_problems(parsed.prompt, parsed.chosen, parsed.rejected)
    if problems:
        return None, problems[0] if len(problems) == 1 else RowError(
            ",".join(p.field for p in problems), "; ".join(f"{p.field} {p.reason}" for p in problems)
        )
    flags = list(parsed.flags)
    if parsed.chosen == parsed.rejected:
        if not cfg.keep_identical:
            return None, RowError("chosen,rejected", "chosen == rejected (no preference to learn)")
        flags.append("identical")
    row = S.human_row(
        prompt=parsed.prompt,
        chosen=parsed.chosen,
        rejected=parsed.rejected,
        subset=parsed.subset,
        source_file=label,
        source_line=rec.line,
        flags=flags,
        meta=meta_json(parsed.meta),
        margin=parsed.margin,
    )
    return row, None


def _quarantine(label: str, rec: Record, err: RowError) -> dict[str, Any]:
    return {"file": label, "line": rec.line, "field": err.field, "reason": err.reason, "raw": rec.raw}


def _check_bad_fraction(label: str, n: int, bad: list[dict], limit: float) -> None:
    if n == 0:
        raise DataFileError(f"{label}: no rows")
    if len(bad) / n > limit:
        top = Counter(f"{q['field']}: {q['reason']}" for q in bad).most_common(3)
        first = bad[0]
        raise DataFileError(
            f"{label}: {len(bad)} of {n} rows unusable (more than data.max_bad_fraction={limit}); "
            f"first at line {first['line']} ({first['field']}: {first['reason']}); commonest: "
            + "; ".join(f"{r} ×{c}" for r, c in top)
            + ". Wrong --data.format or --data.columns?"
        )


def _finish(rows: list[dict[str, Any]], cfg: DataConfig, seed: int) -> pa.Table:
    ids = [r[S.PAIR_ID] for r in rows]
    groups = [r[S.PROMPT] if cfg.split_by == "prompt" else r[S.PAIR_ID] for r in rows]
    keep = select_subset(ids, groups, cfg.max_pairs, seed)
    rows = [rows[i] for i in keep]
    splits = assign_splits([ids[i] for i in keep], [groups[i] for i in keep], cfg.val_fraction, cfg.test_fraction, seed)
    for r, s in zip(rows, splits):
        r[S.SPLIT] = str(s)
    return pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA)


def _report(read, table, quarantine, formats, files, cfg: DataConfig, seconds: float) -> dict[str, Any]:
    """Counts that add up: read == kept + quarantined, kept == selected + not_selected."""
    selected = table.num_rows
    kept = read - len(quarantine)
    splits = Counter(table.column(S.SPLIT).to_pylist())
    flags = Counter(f for fl in table.column(S.FLAGS).to_pylist() for f in fl)
    return {
        "read": read,
        "kept": kept,
        "quarantined": len(quarantine),
        "selected": selected,  # pairs in the output (data.max_pairs, deterministic under seed)
        "not_selected": kept - selected,
        "splits": {s: splits.get(s, 0) for s in SPLITS},
        "quarantine_reasons": dict(Counter(f"{q['field']}: {q['reason']}" for q in quarantine).most_common()),
        "flags": dict(flags),
        "formats": formats,
        "files": [str(f) for f in files],
        "seconds": round(seconds, 3),
    }


def write_quarantine(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write quarantine records as JSON Lines (one per bad row)."""
    from mars_ray.core.atomic import write_jsonl

    return write_jsonl(path, records)


def to_ray_dataset(table: pa.Table):
    """The table as a Ray Dataset (same schema). Imports ray lazily."""
    import ray.data

    return ray.data.from_arrow(table)


def length_stats(table: pa.Table, tokenizer, cfg: DataConfig) -> dict[str, Any]:
    """Token-length percentiles and how many pairs the limits would truncate (none are dropped)."""
    cols = {c: table.column(c).to_pylist() for c in (S.PROMPT, S.CHOSEN, S.REJECTED)}
    lens = {
        c: np.array([len(ids) for ids in tokenizer(v, add_special_tokens=False)["input_ids"]]) for c, v in cols.items()
    }
    out: dict[str, Any] = {}
    for c, arr in lens.items():
        out[c] = {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 99)} | {"max": int(arr.max())}
    resp_cut = (lens[S.CHOSEN] > cfg.max_response_tokens) | (lens[S.REJECTED] > cfg.max_response_tokens)
    out["prompt_left_truncated"] = int((lens[S.PROMPT] > cfg.max_prompt_tokens).sum())
    out["response_capped"] = int(resp_cut.sum())
    out["limits"] = {"max_prompt_tokens": cfg.max_prompt_tokens, "max_response_tokens": cfg.max_response_tokens}
    return out
