"""Quality gates for generated text: paraphrases (meaning kept, not a copy) and rewrites (no new harm).

Pure string functions; semantic similarity is passed in (computed by an encoder elsewhere).
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from importlib import resources

_WS = re.compile(r"\s+")
# A lead-in such as "Here is a paraphrase:", "To paraphrase the text, I would rephrase it to:",
# "Rewritten response:" -- a short clause naming the task and ending in a colon.
_LABEL = re.compile(
    r"^\s*(?:[^:\n]{0,80}\b(?:paraphrase|paraphrased|rephrase|rephrased|rewrite|rewritten|reworded)\b[^:\n]{0,40}|response|answer):\s*",
    re.I,
)
_WORD = re.compile(r"[a-z0-9']+")

PARAPHRASE_REASONS = ("empty", "degenerate", "too_short", "too_long", "near_copy", "meaning_drift")


def clean_generation(text: str | None) -> str:
    """Strip what chat models wrap around an answer: labels, surrounding quotes, whitespace."""
    if not text:
        return ""
    t = _LABEL.sub("", text.strip(), count=1).strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'`":
        t = t[1:-1].strip()
    return t


def normalise(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def copy_similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] of the normalised texts (1 = identical)."""
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return 1.0
    return difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio()


def is_degenerate(text: str, max_repeat_fraction: float = 0.5) -> bool:
    """True for looping output: most word trigrams repeated, or one word making up most of it."""
    words = _WORD.findall(text.lower())
    if len(words) < 6:
        return False
    trigrams = list(zip(words, words[1:], words[2:]))
    if 1 - len(set(trigrams)) / len(trigrams) > max_repeat_fraction:
        return True
    top = max(words.count(w) for w in set(words))
    return top / len(words) > max_repeat_fraction


def paraphrase_rejection(
    source: str,
    candidate: str,
    *,
    min_length_ratio: float,
    max_length_ratio: float,
    max_copy_similarity: float,
    min_semantic_similarity: float | None = None,
    semantic_similarity: float | None = None,
) -> str | None:
    """Why ``candidate`` is not an acceptable paraphrase of ``source`` (one of
    :data:`PARAPHRASE_REASONS`), or None when it passes every gate."""
    if not candidate or not candidate.strip():
        return "empty"
    if is_degenerate(candidate):
        return "degenerate"
    ratio = len(candidate) / max(len(source), 1)
    if ratio < min_length_ratio:
        return "too_short"
    if ratio > max_length_ratio:
        return "too_long"
    if copy_similarity(source, candidate) > max_copy_similarity:
        return "near_copy"
    if (
        min_semantic_similarity is not None
        and semantic_similarity is not None
        and semantic_similarity < min_semantic_similarity
    ):
        return "meaning_drift"
    return None


@lru_cache(maxsize=1)
def harm_lexicon() -> tuple[str, ...]:
    """Lower-case phrases that mark clearly harmful content (a file in the package)."""
    text = (resources.files("mars_ray") / "prompts" / "harm_lexicon.txt").read_text(encoding="utf-8")
    return tuple(ln.strip().lower() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


def introduced_harm(new_text: str, context: str, lexicon: tuple[str, ...] | None = None) -> str | None:
    """The first harmful phrase that ``new_text`` contains and ``context`` (the prompt and the
    original responses) does not, or None. A rewrite may keep what the data already had; it must
    not add new harmful content."""
    lex = harm_lexicon() if lexicon is None else lexicon
    new, ctx = normalise(new_text), normalise(context)
    for phrase in lex:
        if phrase in new and phrase not in ctx:
            return phrase
    return None
