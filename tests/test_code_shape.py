"""The package's shape, as a reviewer reads it: modules by job (≤ 450 lines; augment.py, one recipe
table, aside), functions that fit on a screen (≤ 80 lines)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "barlow"
MAX_MODULE, MAX_FUNCTION = 450, 80
LONG_MODULES_ALLOWED = {"augment.py"}


def _too_long(source: str) -> list[str]:
    return [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION]


def test_modules_and_functions_are_short():
    long_modules, long_functions = {}, {}
    for f in sorted(PACKAGE.rglob("*.py")):
        text = f.read_text()
        if len(text.splitlines()) > MAX_MODULE and f.name not in LONG_MODULES_ALLOWED:
            long_modules[f.name] = len(text.splitlines())
        if _too_long(text):
            long_functions[f.name] = _too_long(text)
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_the_function_check_counts_lines():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    assert _too_long(f"def f():\n{body}\n") == [f"f ({MAX_FUNCTION + 1} lines)"]
    assert _too_long("def g():\n    return 1\n") == []
