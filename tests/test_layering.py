"""The packages' layering (DESIGN.md: data flows one way): no module imports a package above it.
common/ is below all four; filters import nothing from pipeline; samplers nothing from trainer;
pipeline nothing from trainer (its `curate` entry point names trainer's commands as strings, and the
demo runs `curate train` through that entry point)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "filters", "pipeline", "samplers", "trainer")
FORBIDDEN = {
    "common": {"filters", "pipeline", "samplers", "trainer"},
    "filters": {"pipeline", "samplers", "trainer"},
    "samplers": {"trainer"},
    "pipeline": {"trainer"},
    "trainer": set(),
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_import(package):
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package])
             for p in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}
