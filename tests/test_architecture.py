"""The code keeps the shape docs/architecture.md describes: small modules, short functions, a short loop
and a short assembly. Measured with `ast`, so a test names the file and the function that grew."""

from __future__ import annotations

import ast
from pathlib import Path

import ds_trainer

PACKAGE = Path(ds_trainer.__file__).parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_CORE_LINES = 40  # pretrain() and Trainer.fit: each a few named steps


def functions(tree: ast.AST) -> dict[str, int]:
    """Qualified name → lines (def line to last line) of every function and method in `tree`."""
    out = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def modules() -> dict[str, str]:
    return {str(f.relative_to(PACKAGE)): f.read_text() for f in sorted(PACKAGE.rglob("*.py"))}


def test_functions_counts_every_def_with_its_length():
    src = "def a():\n    pass\n\n\nclass B:\n    def c(self):\n        x = 1\n        return x\n"
    assert functions(ast.parse(src)) == {"a": 2, "B.c": 3}


def test_no_module_is_over_600_lines():
    long = {name: n for name, text in modules().items() if (n := len(text.splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_over_80_lines():
    long = {
        f"{name}:{fn}": n
        for name, text in modules().items()
        for fn, n in functions(ast.parse(text)).items()
        if n > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_pretrain_and_the_loop_are_short():
    lengths = {
        "pretrain": functions(ast.parse((PACKAGE / "pretrain.py").read_text()))["pretrain"],
        "Trainer.fit": functions(ast.parse((PACKAGE / "trainer.py").read_text()))["Trainer.fit"],
    }
    assert all(n < MAX_CORE_LINES for n in lengths.values()), lengths
