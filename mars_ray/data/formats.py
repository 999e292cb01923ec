"""Row parsers: one source row (a mapping) -> (prompt, chosen, rejected, subset, flags, meta).

Each parser raises :class:`~mars_ray.core.validation.RowError` naming the field and the reason
when the row cannot become a preference pair. Parsers never see files; :mod:`.files` does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mars_ray.core.validation import RowError, text_problem

ASSISTANT = "\n\nAssistant:"


@dataclass
class ParsedPair:
    prompt: Any
    chosen: Any
    rejected: Any
    subset: Any = None
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _require(row: Mapping[str, Any], name: str, column: str | None = None) -> Any:
    col = column or name
    if col not in row or row[col] is None:
        raise RowError(col, "missing")
    return row[col]


def _text(row: Mapping[str, Any], name: str) -> str:
    value = _require(row, name)
    why = text_problem(value)
    if why:
        raise RowError(name, why)
    return value


def _subset(row: Mapping[str, Any], column: str = "subset") -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(column, f"expected a string, got {type(value).__name__}")
    return value


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by binary search over C-level slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (prompt, chosen response, rejected response).

    The prompt is the shared prefix of both transcripts up to and including its last
    ``"\\n\\nAssistant:"``; each response is what follows, without the leading space.
    """
    common = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, common)  # the last marker lying wholly in the shared prefix
    if cut < 0:
        field_name = "chosen" if ASSISTANT not in chosen else "rejected"
        raise RowError(field_name, "no shared '\\n\\nAssistant:' turn to split the prompt from the response")
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:].lstrip(" "), rejected[end:].lstrip(" ")


def parse_hh(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    chosen = _text(row, "chosen")
    rejected = _text(row, "rejected")
    prompt, c, r = split_hh_transcripts(chosen, rejected)
    return ParsedPair(prompt, c, r)


def parse_pairs(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    meta = {k: row[k] for k in ("source_index", "id", "metadata") if k in row}
    return ParsedPair(row.get("prompt"), row.get("chosen"), row.get("rejected"), _subset(row), meta=meta)


def parse_rewardbench(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    subset = _subset(row)
    if subset is None:
        raise RowError("subset", "missing (RewardBench rows name their subset)")
    meta = {k: row[k] for k in ("id", "source_index", "source_label") if k in row}
    return ParsedPair(row.get("prompt"), row.get("chosen"), row.get("rejected"), subset, meta=meta)


def parse_pku(row: Mapping[str, Any], *, pku_label: str = "safer", **_: Any) -> ParsedPair:
    if "response_0" not in row and "chosen" in row:
        return parse_pairs(row)  # already binarised (prompt/chosen/rejected)
    key = "safer_response_id" if pku_label == "safer" else "better_response_id"
    label = _require(row, key)
    if isinstance(label, bool) or label not in (0, 1, "0", "1"):
        raise RowError(key, f"expected 0 or 1, got {label!r}")
    label = int(label)
    r0, r1 = _require(row, "response_0"), _require(row, "response_1")
    chosen, rejected = (r0, r1) if label == 0 else (r1, r0)
    meta = {
        k: row[k]
        for k in ("is_response_0_safe", "is_response_1_safe", "better_response_id", "safer_response_id")
        if k in row
    }
    return ParsedPair(row.get("prompt"), chosen, rejected, meta=meta)


def _last_assistant(messages: Any, name: str) -> tuple[str | None, str]:
    """(prompt text or None, last assistant content) from a chat message list."""
    if not isinstance(messages, list) or not messages:
        raise RowError(name, "expected a string or a non-empty list of chat messages")
    for m in messages:
        if not isinstance(m, Mapping) or "content" not in m or "role" not in m:
            raise RowError(name, "chat messages must be objects with 'role' and 'content'")
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(name, f"last chat message has role {last['role']!r}, expected 'assistant'")
    context = messages[:-1]
    prompt = None
    if context:
        if len(context) == 1 and context[0]["role"] == "user":
            prompt = context[0]["content"]
        else:
            prompt = "".join(
                f"\n\n{'Human' if m['role'] == 'user' else m['role'].capitalize()}: {m['content']}" for m in context
            )
            prompt += ASSISTANT
    return prompt, last["content"]


def parse_ultrafeedback(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    chosen, rejected = _require(row, "chosen"), _require(row, "rejected")
    prompt = row.get("prompt")
    if isinstance(chosen, list):
        p_c, chosen = _last_assistant(chosen, "chosen")
        prompt = prompt if prompt is not None else p_c
    if isinstance(rejected, list):
        p_r, rejected = _last_assistant(rejected, "rejected")
        prompt = prompt if prompt is not None else p_r
    meta: dict[str, Any] = {}
    flags: list[str] = []
    for k in ("score_chosen", "score_rejected", "source_index", "prompt_id"):
        if k in row:
            meta[k] = row[k]
    md = row.get("metadata")
    if isinstance(md, Mapping):
        meta.update({k: md[k] for k in ("score_chosen", "score_rejected") if k in md})
    sc, sr = meta.get("score_chosen"), meta.get("score_rejected")
    if isinstance(sc, (int, float)) and isinstance(sr, (int, float)) and sc == sr:
        flags.append("score_tie")
    return ParsedPair(prompt, chosen, rejected, flags=flags, meta=meta)


def make_generic(columns: Mapping[str, str]) -> Callable[..., ParsedPair]:
    def parse_generic(row: Mapping[str, Any], **_: Any) -> ParsedPair:
        for name in ("prompt", "chosen", "rejected"):
            col = columns[name]
            if col not in row:
                raise RowError(col, f"missing (mapped from {name})")
        sub_col = columns.get("subset")
        return ParsedPair(
            row[columns["prompt"]],
            row[columns["chosen"]],
            row[columns["rejected"]],
            _subset(row, sub_col) if sub_col else None,
        )

    return parse_generic


PARSERS: dict[str, Callable[..., ParsedPair]] = {
    "pairs": parse_pairs,
    "hh-rlhf": parse_hh,
    "pku-saferlhf": parse_pku,
    "ultrafeedback": parse_ultrafeedback,
    "rewardbench": parse_rewardbench,
}


def detect_format(row: Mapping[str, Any]) -> str | None:
    """Guess the reader from one row's fields, or None when nothing fits."""
    keys = set(row)
    if {"response_0", "response_1"} <= keys:
        return "pku-saferlhf"
    if {"chosen", "rejected"} <= keys:
        if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
            return "ultrafeedback"
        if "prompt" not in keys:
            return "hh-rlhf"
        if "subset" in keys:
            return "rewardbench"
        if "score_chosen" in keys or (isinstance(row.get("metadata"), Mapping) and "score_chosen" in row["metadata"]):
            return "ultrafeedback"
        return "pairs"
    return None


def meta_json(meta: Mapping[str, Any]) -> str | None:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None
