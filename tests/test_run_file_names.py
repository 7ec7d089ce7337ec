"""One owner of run folders: no module but `kdlab.engine.run_folder` spells a run file's name in
code (docstrings, comments and help texts may mention them), so a renamed or added run file has
one place to change."""
from __future__ import annotations

import ast
from pathlib import Path

from kdlab.engine.run_folder import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, RESULT_FILE

KDLAB = Path(__file__).resolve().parents[1] / "kdlab"
NAMES = {CONFIG_FILE, RESULT_FILE, METRICS_FILE, *CHECKPOINTS}


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_run_file_names_live_in_run_folder_only():
    found = []
    for path in sorted(KDLAB.rglob("*.py")):
        if path.name == "run_folder.py":
            continue
        for line, text in _code_strings(ast.parse(path.read_text(), filename=str(path))):
            if text in NAMES:
                found.append(f"{path.relative_to(KDLAB.parent)}:{line}: {text!r}")
    assert not found, "run-file names spelled outside kdlab/engine/run_folder.py:\n" + "\n".join(found)


def test_the_check_finds_a_spelled_name():
    tree = ast.parse('"""Writes result.json."""\nopen(folder / "result.json")\n')
    assert [text for _, text in _code_strings(tree)] == ["result.json"]
