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
    (bad / "bad.py").write_text("from rtxjit.exec import executor\nimport torch\n\n"
                                "def f():\n    executor.hold = None\n    setattr(torch.backends, 'x', 1)\n")
    assert assignments_into_modules(bad) == ["rtxjit/bad.py:5: executor.hold",
                                          "rtxjit/bad.py:6: setattr(torch.backends, 'x', 1)"]


# --- import cycles --------------------------------------------------------------------------------

# Cycles known and left for now, each with its reason: ``frozenset(modules) -> why``. A new cycle, or
# a known one that grows, fails the test; a known one that is gone fails it too (drop it here).
KNOWN_CYCLES: dict = {}


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict:
    """module -> the package's modules it imports, imports inside functions included. A package's
    ``__init__`` is left out (its re-exports are not a module's dependency): ``from a.b import c``
    counts as importing ``a.b.c`` where that is a module, else ``a.b``."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    top = package.name
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if name in packages else name.split(".")[:-1]
                    here = here[:len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target.split(".")[0] == top and target in files:
                    deps.add(target)
        graph[name] = deps - {name}
    return {m: deps - packages for m, deps in graph.items() if m not in packages}


def import_cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(graph: dict, cycle: list) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(cycle)))}" for m in cycle)


def test_no_import_cycle_among_rtxjits_modules():
    graph = import_graph()
    cycles = import_cycles(graph)
    new = [_describe(graph, c) for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles (imports inside functions count):\n" + "\n".join(new)
    gone = [sorted(c) for c in KNOWN_CYCLES if list(sorted(c)) not in cycles]
    assert not gone, f"known cycles that are gone: {gone}; remove them from KNOWN_CYCLES"


def test_the_scan_sees_a_cycle_hidden_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub import b\n\ndef f():\n    return b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    (pkg / "c.py").write_text("import pkg\n")  # through the package's __init__ only: not a cycle
    graph = import_graph(pkg)
    assert import_cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]
    assert graph["pkg.c"] == set()


def subpackage_shares(package: Path = PACKAGE) -> dict:
    """Each direct sub-package's share of the package's source lines (modules at the top level
    are not a sub-package)."""
    lines = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        if len(parts) > 1:
            lines[parts[0]] = lines.get(parts[0], 0) + len(path.read_text().splitlines())
    total = sum(len(p.read_text().splitlines()) for p in package.rglob("*.py"))
    return {name: n / total for name, n in lines.items()}


def test_no_subpackage_holds_more_than_a_quarter_of_the_lines():
    big = {name: f"{share:.1%}" for name, share in subpackage_shares().items() if share > 0.25}
    assert not big, f"sub-packages over 25% of rtxjit's lines (split them by responsibility): {big}"


def test_the_share_counts_nested_modules(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "m.py").write_text("x = 1\n" * 3)
    (tmp_path / "top.py").write_text("y = 2\n")
    assert subpackage_shares(tmp_path) == {"a": 0.75}
