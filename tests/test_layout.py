"""The repository's shape, checked: the one-way dependency flow between the packages
(docs/design.md section 2), one job per file (an opening docstring, no file over ~450 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "teacher_cache", "student_train", "evaluation")
#: What each package may import from the others.
ALLOWED = {
    "shared": set(),
    "teacher_cache": {"shared"},
    "student_train": {"shared"},
    "evaluation": {"shared", "student_train"},
}
MAX_LINES = 460


def _modules(package: str):
    return sorted((REPO / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_flow_one_way(package):
    bad = {}
    for path in _modules(package):
        wrong = _imported_packages(path) - ALLOWED[package] - {package}
        if wrong:
            bad[str(path.relative_to(REPO))] = sorted(wrong)
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}: {bad}"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_file_says_its_job_and_stays_small(package):
    for path in _modules(package):
        text = path.read_text(encoding="utf-8")
        if path.name == "__init__.py" and len(text.strip()) < 200:
            continue
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(REPO)} has no opening docstring"
        n = text.count("\n")
        assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (> {MAX_LINES}): split it along its jobs"
