"""The house rules, read from the imports (every import, module-level or inside a function): the core imports no
app; eval and analysis read checkpoints and import neither the trainer nor each other; train reaches analysis only
through its checkpoint hook; compare runs the apps as commands and imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("train", "eval", "analysis", "compare")
# package → the apps it may import (beyond itself and the core), and the only modules of them it may import
ALLOWED = {"midtune": {}, "eval": {}, "analysis": {}, "compare": {}, "train": {"analysis": {"analysis.hook"}}}


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_the_layout_allows(package):
    crossings = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(f):
            top = module.split(".")[0]
            if top not in APPS or top == package:
                continue
            allowed = ALLOWED[package].get(top)
            if allowed is None or module not in allowed:
                crossings.append(f"{f.relative_to(ROOT)}:{line} imports {module}")
    assert not crossings, "\n".join(crossings)


def test_the_rules_catch_a_crossing(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from eval.tasks import ensure_shapes_data\n")
    assert imports(bad) == [(2, "eval.tasks")]
