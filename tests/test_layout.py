"""The house rules of the package layout, read from the source (no imports executed).

Each package may import only the layers below it (``docs/architecture.md``); a module-level
``import ray`` is allowed only where Ray wiring lives. A new import that breaks a rule fails here
with the file and line, so the layering stays what the package docstrings say it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mars_ray"

# package -> the mars_ray packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "core": set(),
    "models": {"core"},
    "generation": {"core", "models"},
    "data": {"config", "core", "models"},
    "runtime": {"config"},
    "stages": {"config", "core", "models", "generation", "runtime"},
    "train": {"config", "core", "models", "runtime"},
    "serve": {"config", "core", "models", "generation", "runtime"},
    "report": {"config", "core"},
}
# packages whose modules may not import ray at module level (Ray only inside functions, or never)
NO_TOP_LEVEL_RAY = {"config", "core", "models", "generation", "data", "report"}
NEVER_RAY = {"config", "core", "models", "generation"}


def _package(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports(tree: ast.Module):
    """(module name, line, at module level) for every import in a file."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top


def _problems(path: Path, source: str) -> list[str]:
    problems = []
    pkg = _package(path)
    for mod, line, at_top in _imports(ast.parse(source)):
        parts = mod.split(".")
        where = f"{path.relative_to(PKG.parent)}:{line}"
        if parts[0] == "mars_ray" and len(parts) > 1 and pkg in ALLOWED:
            dep = parts[1]
            if dep != pkg and dep not in ALLOWED[pkg]:
                problems.append(f"{where}: {pkg} imports mars_ray.{dep}")
        if parts[0] == "ray":
            if pkg in NEVER_RAY:
                problems.append(f"{where}: {pkg} imports {mod} (never Ray here)")
            elif pkg in NO_TOP_LEVEL_RAY and at_top:
                problems.append(f"{where}: {pkg} imports {mod} at module level")
    return problems


def test_every_package_imports_only_the_layers_below_it():
    problems = [p for path in sorted(PKG.rglob("*.py")) for p in _problems(path, path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


def test_every_package_says_what_lives_there():
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 15, f"{init.relative_to(PKG.parent)}: no docstring saying what lives there"


def test_the_rules_catch_violations():
    """The checker itself, on made-up sources."""
    src = "import ray\nfrom mars_ray.stages import score\n\ndef f():\n    import ray.data\n"
    assert _problems(PKG / "core" / "x.py", src) == [
        "mars_ray/core/x.py:1: core imports ray (never Ray here)",
        "mars_ray/core/x.py:2: core imports mars_ray.stages",
        "mars_ray/core/x.py:5: core imports ray.data (never Ray here)",
    ]
    assert _problems(PKG / "data" / "x.py", src) == [
        "mars_ray/data/x.py:1: data imports ray at module level",
        "mars_ray/data/x.py:2: data imports mars_ray.stages",
    ]
    assert _problems(PKG / "stages" / "x.py", src) == []
