"""The layout rules the code keeps, checked from its syntax (``ast``).

* Boundaries by public names: no module of ``server/`` or ``client/`` imports
  another Tillwire module's underscore-prefixed name (nor reaches one as an
  attribute of an imported module).  Where a private is needed across
  modules, an interface is missing.
* The SQLite store's modules (``store_sqlite*``, ``store_writer``) import
  each other in one direction only: no import cycle, also through imports
  inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "client")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["tillwire", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` (at ``path``) names."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(module: str, path: Path):
    """(imported module, name or None, line) for every import in the file,
    and (module, attribute, line) for attributes reached on an imported module."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}          # local name -> module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            for alias in node.names:
                found.append((source, alias.name, node.lineno))
                bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, None, node.lineno))
                if alias.asname:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and bound[node.value.id].startswith("tillwire.")):
            found.append((bound[node.value.id], node.attr, node.lineno))
    return found


def _private_imports() -> list[tuple[str, str, str, int]]:
    """(file, module, private name, line) of every import of another module's private."""
    out = []
    for module, path in _modules().items():
        for source, name, line in _imports(module, path):
            if not source.startswith("tillwire") or source == module:
                continue
            parts = source.split(".")[1:] + ([name] if name else [])
            for part in parts:
                if _private(part):
                    out.append((str(path.relative_to(ROOT)), source, name or source, line))
                    break
    return out


def test_no_module_imports_another_modules_private_names():
    found = _private_imports()
    assert not found, "imports of private names:\n" + "\n".join(
        f"{file}:{line}: {name} from {source}" for file, source, name, line in found)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, set())
        for source, name, _ in _imports(module, path):
            if name and f"{source}.{name}" in modules:     # from package import module
                edges.add(f"{source}.{name}")
            elif source in modules and source != module:
                edges.add(source)
    return graph


def test_the_sqlite_store_modules_form_no_import_cycle():
    store = {m for m in _modules()
             if m.rsplit(".", 1)[-1].startswith("store_sqlite") or m.endswith(".store_writer")}
    assert "tillwire.server.store_sqlite_writer" in store and len(store) >= 7
    tangled = [sorted(c) for c in _cycles(_import_graph()) if c & store]
    assert not tangled, f"import cycles through the SQLite store: {tangled}"
