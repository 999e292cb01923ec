"""`mars-ray data prepare` and `mars-ray data inspect`: the data layer's on-disk outputs.

A prepared directory holds::

    pairs.parquet      every selected pair (PAIR_SCHEMA, with its split)
    quarantine.jsonl   one JSON object per unusable row: file, line, field, reason, raw
    data_report.json   counts that add up, split sizes, reasons, token-length statistics
    config.yaml        the resolved config that produced it
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mars_ray.config import Config
from mars_ray.core.atomic import write_json
from mars_ray.data.load import length_stats, read_preferences, write_quarantine

PAIRS_FILE = "pairs.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
REPORT_FILE = "data_report.json"


def _tokenizer(cfg: Config):
    from mars_ray.models import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer or cfg.model.reward)


def prepare(cfg: Config, *, with_lengths: bool = True) -> dict[str, Any]:
    """Read, validate and split ``cfg.data``; write the prepared directory ``cfg.output.dir``.

    Returns the report (also written as ``data_report.json``).

    Raises:
        DataFileError: unusable input. ModelResolutionError: the tokenizer cannot be found.
    """
    result = read_preferences(cfg.data, seed=cfg.seed)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(result.report)
    if with_lengths:
        report["lengths"] = length_stats(result.table, _tokenizer(cfg), cfg.data)
    tmp = out / (PAIRS_FILE + ".tmp")
    pq.write_table(result.table, tmp)
    os.replace(tmp, out / PAIRS_FILE)
    write_quarantine(result.quarantine, out / QUARANTINE_FILE)
    report["output"] = str(out)
    report["config_hash"] = cfg.hash()
    write_json(out / REPORT_FILE, report)
    cfg.save(out)
    return report


def inspect(path: str | None, cfg: Config) -> dict[str, Any]:
    """Report on a prepared directory (reads its report) or a data file (reads it, writes nothing)."""
    if path and Path(path).is_dir():
        report_path = Path(path) / REPORT_FILE
        if not report_path.exists():
            raise FileNotFoundError(
                f"{path}: not a prepared directory (no {REPORT_FILE}); run `mars-ray data prepare` first"
            )
        return json.loads(report_path.read_text(encoding="utf-8"))
    if path:
        cfg.set("data.path", path)
    result = read_preferences(cfg.data, seed=cfg.seed)
    info = dict(result.report)
    info["lengths"] = length_stats(result.table, _tokenizer(cfg), cfg.data)
    return info
