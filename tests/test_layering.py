"""How rtxjit's modules depend on each other, checked on their source (issue 16, STYLE.md): no
module assigns into another module's attributes (collaborators are passed to constructors or as
parameters instead), and no import cycle among rtxjit's modules."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import rtxjit

PACKAGE = Path(rtxjit.__file__).parent


def _sources(package: Path):
    for path in sorted(package.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _module_names(tree: ast.AST) -> set:
    """Names that a module binds to modules by its imports (anywhere in it, functions included)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if _is_module(f"{node.module}.{alias.name}"):
                    names.add(alias.asname or alias.name)
    return names


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def assignments_into_modules(package: Path = PACKAGE) -> list:
    """``path:line: target`` of every assignment (``=``, augmented, annotated, ``del``) to an
    attribute reached from an imported module (``executor.hold = ...``,
    ``torch.backends.x.flag = ...``), and every ``setattr``/``delattr`` on one."""
    found = []
    for path, tree in _sources(package):
        modules = _module_names(tree)
        where = path.relative_to(package.parent)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                for t in target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]:
                    root = _root(t)
                    if isinstance(t, ast.Attribute) and isinstance(root, ast.Name) and root.id in modules:
                        found.append(f"{where}:{node.lineno}: {ast.unparse(t)}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("setattr", "delattr") and node.args):
                root = _root(node.args[0])
                if isinstance(root, ast.Name) and root.id in modules:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_assigns_into_another_modules_attributes():
    assert assignments_into_modules() == []


def test_the_scan_sees_an_assignment_into_a_module(tmp_path):
    bad = tmp_path / "rtxjit"
    bad.mkdir()
    (bad / "bad.py").write_text("from rtxjit.runtime import executor\nimport torch\n\n"
                                "def f():\n    executor.hold = None\n    setattr(torch.backends, 'x', 1)\n")
    assert assignments_into_modules(bad) == ["rtxjit/bad.py:5: executor.hold",
                                          "rtxjit/bad.py:6: setattr(torch.backends, 'x', 1)"]

