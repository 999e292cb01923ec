"""Prompt templates: files in ``mars_ray/prompts/``, not strings in code.

A template file has a ``### system`` section and a ``### user`` section; ``{name}`` placeholders
are filled with :func:`render`. Literal braces are written ``{{`` and ``}}``. Lines before the
first section are comments.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    user: str

    @property
    def wording(self) -> str:
        """The template's own text, both sections (placeholders included)."""
        return f"{self.system}\n{self.user}"

    def render(self, **values: str) -> list[dict[str, str]]:
        msgs = []
        if self.system:
            msgs.append({"role": "system", "content": self.system.format(**values)})
        msgs.append({"role": "user", "content": self.user.format(**values)})
        return msgs


def parse_prompt(name: str, text: str) -> PromptTemplate:
    """A template from the text of a template file.

    Raises:
        ValueError: no ``### user`` section.
    """
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:].strip().lower()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if "user" not in sections:
        raise ValueError(f"prompt template {name!r} has no '### user' section")
    return PromptTemplate(name, "\n".join(sections.get("system", [])).strip(), "\n".join(sections["user"]).strip())


@cache
def load_prompt(name: str) -> PromptTemplate:
    """Read ``<name>.txt`` from this package.

    Raises:
        FileNotFoundError: no such template. ValueError: no ``### user`` section.
    """
    try:
        text = (resources.files("mars_ray") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no prompt template {name!r} in mars_ray/prompts") from None
    return parse_prompt(name, text)


def render(name: str, **values: str) -> list[dict[str, str]]:
    return load_prompt(name).render(**values)
