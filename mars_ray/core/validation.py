"""Row-level checks shared by every reader. Pure functions; the data layer decides what to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RowError(Exception):
    """A row that cannot become a preference pair: which field and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def text_problem(value: object) -> str | None:
    """Why ``value`` is not usable text, or None when it is."""
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "empty or whitespace-only"
    if not value.isascii():
        try:
            value.encode("utf-8")  # fails only on lone surrogates, i.e. undecodable input bytes
        except UnicodeEncodeError:
            return "invalid UTF-8 (undecodable bytes)"
    return None


def pair_problems(prompt: object, chosen: object, rejected: object) -> list[RowError]:
    """Every reason the triple is not a valid preference pair (empty list when it is).

    The prompt may be empty only if it is a string (some datasets have context-free pairs):
    an empty prompt is legal, a non-string one is not.
    """
    errors: list[RowError] = []
    if prompt is None:
        errors.append(RowError("prompt", "missing"))
    elif not isinstance(prompt, str):
        errors.append(RowError("prompt", f"expected a string, got {type(prompt).__name__}"))
    elif text_problem(prompt) and prompt.strip():
        errors.append(RowError("prompt", text_problem(prompt) or ""))
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        why = text_problem(value)
        if why:
            errors.append(RowError(name, why))
    return errors
