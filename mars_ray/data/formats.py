"""Row parsers: one source row (a mapping) -> (prompt, chosen, rejected, subset, flags, meta).

Each parser raises :class:`~mars_ray.core.validation.RowError` naming the field and the reason
when the row cannot become a preference pair. Parsers never see files; :mod:`.files` does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mars_ray.core.chat import ASSISTANT, check_messages, messages_to_prompt, split_implicit, split_last_assistant
from mars_ray.core.validation import RowError, text_problem


@dataclass
class ParsedPair:
    prompt: Any
    chosen: Any
    rejected: Any
    subset: Any = None
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    margin: float | None = None


def label_margin(row: Mapping[str, Any], column: str = "margin") -> float | None:
    """The row's optional label margin (TRL / OpenRLHF ``margin``): a finite number or absent."""
    import math

    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # CSV cells arrive as text
        except (TypeError, ValueError):
            raise RowError(column, f"expected a number, got {value!r}") from None
    if not math.isfinite(float(value)):
        raise RowError(column, f"expected a finite number, got {value!r}")
    return float(value)


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


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into (prompt, chosen response, rejected response): the prompt
    is the shared prefix up to and including its last ``"\\n\\nAssistant:"``."""
    if ASSISTANT not in chosen or ASSISTANT not in rejected:
        field_name = "chosen" if ASSISTANT not in chosen else "rejected"
        raise RowError(field_name, "no shared '\\n\\nAssistant:' turn to split the prompt from the response")
    return split_implicit(chosen, rejected)


def parse_hh(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    """No ``prompt`` field: the prompt is implicit in two full texts (HH-RLHF transcripts, or
    TRL's standard implicit-prompt layout); conversational rows go to :func:`parse_conversational`."""
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return parse_conversational(row)
    chosen = _text(row, "chosen")
    rejected = _text(row, "rejected")
    prompt, c, r = split_implicit(chosen, rejected)
    return ParsedPair(prompt, c, r, meta=_meta(row), margin=label_margin(row))


def _meta(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("source_index", "id", "metadata") if k in row}


def parse_pairs(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    """``prompt``/``chosen``/``rejected``: TRL's standard layout with an explicit prompt, or any of
    its conversational layouts (message lists), which :func:`parse_conversational` reads."""
    if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
        return parse_conversational(row)
    return ParsedPair(
        row.get("prompt"),
        row.get("chosen"),
        row.get("rejected"),
        _subset(row),
        meta=_meta(row),
        margin=label_margin(row),
    )


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


def parse_conversational(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    """TRL's conversational layouts: ``chosen``/``rejected`` message lists ending with the
    assistant turn, and a ``prompt`` message list (explicit) or not (implicit: the messages before
    the last assistant turn, which must agree between chosen and rejected). The prompt is stored
    as a transcript (:func:`~mars_ray.core.chat.messages_to_prompt`)."""
    chosen, rejected = _require(row, "chosen"), _require(row, "rejected")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt = messages_to_prompt(check_messages(prompt, "prompt")) if prompt else ""
    contexts = []
    if isinstance(chosen, list):
        ctx, chosen = split_last_assistant(chosen, "chosen")
        contexts.append(("chosen", ctx))
    if isinstance(rejected, list):
        ctx, rejected = split_last_assistant(rejected, "rejected")
        contexts.append(("rejected", ctx))
    if prompt is None and contexts:
        prompt = messages_to_prompt(contexts[0][1])
        for name, ctx in contexts[1:]:
            if messages_to_prompt(ctx) != prompt:
                raise RowError(name, "its conversation before the last assistant turn differs from chosen's")
    elif contexts and any(ctx for _, ctx in contexts) and isinstance(prompt, str):
        # Explicit prompt and full conversations: the conversations must continue the prompt.
        for name, ctx in contexts:
            if ctx and messages_to_prompt(ctx).strip() != prompt.strip():
                raise RowError(name, "its conversation before the last assistant turn differs from 'prompt'")
    return ParsedPair(prompt, chosen, rejected, _subset(row), meta=_meta(row), margin=label_margin(row))


def parse_ultrafeedback(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    parsed = parse_conversational(row)
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
    return ParsedPair(parsed.prompt, parsed.chosen, parsed.rejected, flags=flags, meta=meta)


def parse_rewardbench2(row: Mapping[str, Any], **_: Any) -> ParsedPair:
    """RewardBench 2 rows hold N completions per prompt, not a pair: they are evaluated with
    ``mars-ray eval`` (best-of-N and Ties scoring), never trained on."""
    raise RowError(
        "chosen",
        "a RewardBench 2 best-of-N row (lists of completions), not a preference pair: score it with mars-ray eval",
    )


def is_best_of_n_row(row: Mapping[str, Any]) -> bool:
    """RewardBench 2's layout: ``chosen`` and ``rejected`` are lists of completion strings."""
    c, r = row.get("chosen"), row.get("rejected")
    return (
        isinstance(c, list)
        and isinstance(r, list)
        and bool(c)
        and all(isinstance(x, str) for x in c)
        and all(isinstance(x, str) for x in r)
    )


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
            margin=label_margin(row, columns["margin"]) if "margin" in columns else None,
        )

    return parse_generic


PARSERS: dict[str, Callable[..., ParsedPair]] = {
    "pairs": parse_pairs,
    "hh-rlhf": parse_hh,
    "pku-saferlhf": parse_pku,
    "ultrafeedback": parse_ultrafeedback,
    "conversational": parse_conversational,
    "rewardbench2": parse_rewardbench2,
    "rewardbench": parse_rewardbench,
}


def detect_format(row: Mapping[str, Any]) -> str | None:
    """Guess the reader from one row's fields, or None when nothing fits."""
    keys = set(row)
    if {"response_0", "response_1"} <= keys:
        return "pku-saferlhf"
    if {"chosen", "rejected"} <= keys:
        if is_best_of_n_row(row):
            return "rewardbench2"
        scored = "score_chosen" in keys or (
            isinstance(row.get("metadata"), Mapping) and "score_chosen" in row["metadata"]
        )
        if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return "ultrafeedback" if scored else "conversational"
        if "prompt" not in keys:
            return "hh-rlhf"
        if "subset" in keys:
            return "rewardbench"
        if scored:
            return "ultrafeedback"
        return "pairs"
    return None


def meta_json(meta: Mapping[str, Any]) -> str | None:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None
