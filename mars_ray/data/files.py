"""Read source files record by record, keeping each record's line and raw text.

Yields :class:`Record` objects; a record that cannot even be parsed (bad UTF-8, bad JSON, not an
object) carries an ``error`` instead of a ``row`` so the caller can quarantine it. Problems that
make a whole file unusable (missing, unknown type, not a JSON array, unreadable parquet) raise
:class:`DataFileError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mars_ray.core.validation import RowError

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class DataFileError(ValueError):
    """A data file that cannot be used as a whole."""


@dataclass
class Record:
    line: int  # 1-based line (jsonl), first line of the row (csv), item (json array), row (parquet)
    raw: str  # the record as read (undecodable bytes shown as \\x escapes) so nothing is lost
    row: dict[str, Any] | None = None
    error: RowError | None = None


def file_kind(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None and path.suffixes[-2:-1] and path.suffix.lower() in {".gz"}:
        raise DataFileError(f"{path}: compressed files are not read directly; decompress it first (gunzip {path.name})")
    if kind is None:
        raise DataFileError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    return kind


def iter_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of a jsonl/json/csv/parquet file.

    Raises:
        DataFileError: the file is missing, of an unknown type, or unusable as a whole.
    """
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: file not found")
    if p.is_dir():
        raise DataFileError(f"{p}: is a directory; give a file (jsonl, json, csv or parquet)")
    kind = file_kind(p)
    yield from {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}[kind](p)


def _obj_record(line: int, raw: str, obj: Any) -> Record:
    if not isinstance(obj, dict):
        return Record(line, raw, error=RowError("<row>", f"expected a JSON object, got {type(obj).__name__}"))
    return Record(line, raw, row=obj)


def _jsonl(p: Path) -> Iterator[Record]:
    with p.open("rb") as f:
        for lineno, bline in enumerate(f, start=1):
            if not bline.strip():
                continue  # blank lines are not rows
            try:
                text = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                raw = bline.decode("utf-8", "backslashreplace").rstrip("\r\n")
                yield Record(lineno, raw, error=RowError("<row>", f"invalid UTF-8 at byte {e.start}"))
                continue
            text = text.rstrip("\r\n")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield Record(lineno, text, error=RowError("<row>", f"not valid JSON: {e.msg} at column {e.colno}"))
                continue
            yield _obj_record(lineno, text, obj)


def _json(p: Path) -> Iterator[Record]:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(
            f"{p}: invalid UTF-8 at byte {e.start}; a .json file must decode as a whole (use .jsonl to quarantine bad lines)"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:
            # JSON Lines saved with a .json suffix.
            yield from _jsonl(p)
            return
        raise DataFileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, dict):
        for key in ("data", "rows", "examples"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise DataFileError(f"{p}: expected a JSON array of rows (or an object with a 'data' array)")
    if not isinstance(obj, list):
        raise DataFileError(f"{p}: expected a JSON array of rows, got {type(obj).__name__}")
    for i, item in enumerate(obj, start=1):
        yield _obj_record(i, json.dumps(item, ensure_ascii=False), item)


def _csv(p: Path) -> Iterator[Record]:
    text = p.read_bytes().decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataFileError(f"{p}: empty CSV file (no header row)") from None
    except csv.Error as e:
        raise DataFileError(f"{p}: unreadable CSV header: {e}") from None
    if any(_has_surrogates(h) for h in header):
        raise DataFileError(f"{p}: invalid UTF-8 in the CSV header")
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Record(start, "", error=RowError("<row>", f"unparseable CSV: {e}"))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not cells or all(not c.strip() for c in cells):
            continue
        raw = ",".join(cells).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if len(cells) != len(header):
            yield Record(line, raw, error=RowError("<row>", f"has {len(cells)} cells, the header has {len(header)}"))
            continue
        row = dict(zip(header, cells))
        bad = [k for k, v in row.items() if _has_surrogates(v)]
        if bad:
            yield Record(line, raw, error=RowError(bad[0], "invalid UTF-8"))
            continue
        yield Record(line, raw, row=row)


def _has_surrogates(s: str) -> bool:
    return any(0xDC80 <= ord(c) <= 0xDCFF for c in s)


def _parquet(p: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataFileError(f"{p}: unreadable parquet file: {e}") from None
    line = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            line += 1
            yield Record(line, json.dumps(row, ensure_ascii=False, default=str), row=row)
