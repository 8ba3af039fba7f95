"""model/ is Sans-I/O: it imports nothing that performs I/O, reads a clock or draws randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"
FORBIDDEN = frozenset({"asyncio", "websockets", "socket", "time", "random"})


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


MODEL_FILES = sorted(MODEL_DIR.glob("*.py"))


def test_model_directory_has_modules_to_check() -> None:
    assert len(MODEL_FILES) >= 5


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_module_imports_no_io_clock_or_randomness(path: Path) -> None:
    assert _imported_roots(path) & FORBIDDEN == set()


def test_the_import_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\nimport asyncio.tasks\n")
    assert _imported_roots(sample) & FORBIDDEN == {"time", "asyncio"}
