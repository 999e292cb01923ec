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


def length_rejection(source: str, candidate: str, min_ratio: float, max_ratio: float) -> str | None:
    """``too_short`` / ``too_long`` when ``candidate`` is outside [min_ratio, max_ratio] times the
    character length of ``source``, else None."""
    ratio = len(candidate) / max(len(source), 1)
    if ratio < min_ratio:
        return "too_short"
    if ratio > max_ratio:
        return "too_long"
    return None


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
    if why := length_rejection(source, candidate, min_length_ratio, max_length_ratio):
        return why
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


# --- The rewrite gate --------------------------------------------------------------------------
# A rewrite is asked for between these markers (the prompt shows them around the given replies,
# which a small model imitates); text outside them is discarded and a missing marker rejects it.
REPLY_OPEN, REPLY_CLOSE = "<reply>", "</reply>"
REWRITE_REASONS = (
    "empty",
    "no_delimiter",
    "unclosed",
    "template_echo",
    "degenerate",
    "truncated",
    "too_short",
    "too_long",
    "off_topic",
)
_OPEN = re.compile(re.escape(REPLY_OPEN), re.I)
_CLOSE = re.compile(re.escape(REPLY_CLOSE), re.I)
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
# Lines that start like a transcript turn or a prompt section: a reply that holds one is the
# conversation or the prompt continued, not a reply.
_ROLE_LINE = re.compile(
    r"(?im)^\W*(?:human|assistant|user|system|conversation|(?:better|worse|preferred|dispreferred|"
    r"good|bad|original|rewritten|new)\s+(?:reply|response|answer))\s*:"
)
_END = re.compile(r"[.!?)\]\"'`*:;…~]\s*$|[\U0001F300-\U0001FAFF]\s*$")


def extract_reply(text: str | None, *, delimited: bool) -> tuple[str | None, str | None]:
    """The reply inside ``<reply> ... </reply>`` (or the whole cleaned text when the prompt did
    not ask for markers), and the reason when there is none: ``no_delimiter`` (no opening marker),
    ``unclosed`` (no closing marker: the model ran into its token cap or forgot the format) or
    ``empty``. Text before the opening or after the closing marker is dropped."""
    if not text or not text.strip():
        return None, "empty"
    if not delimited:
        t = clean_generation(text)
        return (t, None) if t else (None, "empty")
    m = _OPEN.search(text)
    if m is None:
        return None, "no_delimiter"
    rest = text[m.end() :]
    c = _CLOSE.search(rest)
    if c is None:
        return None, "unclosed"
    t = clean_generation(rest[: c.start()])
    return (t, None) if t else (None, "empty")


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _WORD.findall(text.lower())
    return set(zip(*(w[k:] for k in range(n))))


@lru_cache(maxsize=32)
def template_ngrams(template_text: str, n: int = 4) -> frozenset[tuple[str, ...]]:
    """Word n-grams of a prompt template's own wording (placeholders removed): a rewrite that
    repeats one of them (and its sources do not) is echoing the instruction."""
    return frozenset(_ngrams(_PLACEHOLDER.sub(" | ", template_text), n))


_TURN = re.compile(r"(?:^|\n)\s*(?:Human|User)\s*:\s*", re.I)
_ASSISTANT = re.compile(r"\n\s*Assistant\s*:", re.I)


# Talk about the task instead of a reply: "the better reply", "I'll rewrite", "rephrased".
_META = re.compile(
    r"\b(?:(?:better|worse|worst|best|preferred|dispreferred|good|bad|original|new|rewritten|given|first|second|next"
    r"|following)"
    r"\s+(?:reply|replies|response|responses|answer|text)|(?:original|revised|rewritten|given)\s+(?:text|statement)"
    r"|re-?writ\w*|rephras\w*|paraphras\w*|reword\w*|the\s+conversation|smollm)\b",
    re.I,
)


def echoes_template(
    candidate: str, sources: str, ngrams: frozenset[tuple[str, ...]], n: int = 4, replies: str | None = None
) -> bool:
    """True when ``candidate`` repeats an n-gram of the template that ``sources`` (the conversation
    and the given replies) does not contain, talks about the task ("the better reply", "rewrite")
    where ``sources`` does not, or holds a transcript or section label line (``Human:``, ``Better
    reply:``) that ``replies`` (the given replies; default ``sources``) do not: a reply never
    continues the conversation it answers."""
    own = _ngrams(candidate, n) & ngrams
    if own - _ngrams(sources, n):
        return True
    meta = {m.group(0).lower() for m in _META.finditer(candidate)}
    if meta - {m.group(0).lower() for m in _META.finditer(sources)}:
        return True
    cand, given = normalise(candidate), normalise(replies or "")
    for turn in human_turns(sources):  # a question of the conversation asked again, not answered
        q = normalise(turn)
        if len(q.split()) >= 5 and q in cand and q not in given:
            return True
    labels = {m.group(0).strip().lower() for m in _ROLE_LINE.finditer(candidate)}
    if labels:
        have = {m.group(0).strip().lower() for m in _ROLE_LINE.finditer(sources if replies is None else replies)}
        return bool(labels - have)
    return False


def human_turns(prompt: str) -> list[str]:
    """The human turns of a transcript (``Human: ... Assistant: ...``), in order; [] otherwise."""
    parts = _TURN.split(prompt)
    return [t for t in (_ASSISTANT.split(p)[0].strip() for p in parts[1:]) if t]


def last_human_turn(prompt: str) -> str:
    """The last human turn of a transcript (``Human: ... Assistant:``), the question a reply
    answers; a prompt that is not a transcript is returned whole (stripped)."""
    parts = _TURN.split(prompt)
    if len(parts) < 2:
        return prompt.strip()
    turn = _ASSISTANT.split(parts[-1])[0].strip()
    return turn or prompt.strip()


def looks_truncated(text: str, source: str) -> bool:
    """True when ``text`` stops mid-sentence (no closing punctuation, bracket, quote or emoji) while
    the text it rewrites ends cleanly: the generator was cut off."""
    return bool(_END.search(source)) and not _END.search(text)


def rewrite_rejection(
    source: str,
    candidate: str,
    *,
    context: str,
    ngrams: frozenset[tuple[str, ...]],
    replies: str | None = None,
    min_length_ratio: float,
    max_length_ratio: float,
    min_topic_similarity: float | None = None,
    topic_similarity: float | None = None,
) -> str | None:
    """Why ``candidate`` (already taken out of its markers) is not an acceptable rewrite of
    ``source`` (one of :data:`REWRITE_REASONS`), or None. ``context``: the conversation and both
    given replies; ``replies``: the given replies only; ``topic_similarity``: the candidate's
    embedding similarity to the conversation."""
    if not candidate or not candidate.strip():
        return "empty"
    if echoes_template(candidate, context, ngrams, replies=replies):
        return "template_echo"
    if is_degenerate(candidate):
        return "degenerate"
    if looks_truncated(candidate, source):
        return "truncated"
    if why := length_rejection(source, candidate, min_length_ratio, max_length_ratio):
        return why
    if min_topic_similarity is not None and topic_similarity is not None and topic_similarity < min_topic_similarity:
        return "off_topic"
    return None


def judge_rewrite(
    raw: str | None,
    *,
    role: str,
    prompt: str,
    chosen: str,
    rejected: str,
    template_wording: str,
    min_length_ratio: float,
    max_length_ratio: float,
) -> tuple[str | None, str | None]:
    """One raw rewrite output of the ``role`` reply of a pair -> (reply, None) when it passes the
    gate, else (None, reason). Markers are parsed strictly when ``template_wording`` asks for
    them. The topic check needs an encoder and is applied by the caller
    (``rewrite_rejection(..., topic_similarity=...)`` or a threshold on it)."""
    reply, why = extract_reply(raw, delimited=REPLY_OPEN in template_wording)
    if why is None:
        why = rewrite_rejection(
            chosen if role == "chosen" else rejected,
            reply or "",
            context="\n".join((prompt, chosen, rejected)),
            ngrams=template_ngrams(template_wording),
            replies="\n".join((chosen, rejected)),
            min_length_ratio=min_length_ratio,
            max_length_ratio=max_length_ratio,
        )
    return (reply, None) if why is None else (None, why)
