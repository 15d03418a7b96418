"""The package-level import graph of keel and its cycles; exits 1 when there is a cycle.

Every ``import keel.x`` / ``from keel.x import y`` counts, at the top of a file or inside a function (a cycle
hidden by a lazy import is still a cycle). ``from keel.pkg import name`` is an edge to ``keel.pkg.name`` when
that is a module, else to ``keel/pkg/__init__.py``. Standard library only.

    python benchmarks/import_graph.py            # the cycles, one per line (and exit 1 if any)
    python benchmarks/import_graph.py --edges    # every edge as well

Two views, both must be acyclic: modules, and packages (``keel.train.engine`` counts as ``keel.train``; a module
at the top, such as ``keel.rundir``, is its own node). A package cycle is printed with the module imports that
close it, so the one to move is easy to find.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "keel"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _target(name: str, mods: dict[str, Path]) -> str | None:
    """The module an imported dotted name lands in (the longest known prefix)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The keel modules ``name`` imports, anywhere in its file."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [_target(a.name, mods) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in mods else _target(base, mods))
        else:
            continue
        out.update(t for t in targets if t and t != name)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, mods) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def package_of(module: str) -> str:
    """``keel.train.engine`` -> ``keel.train``; ``keel.rundir`` stays ``keel.rundir``."""
    return ".".join(module.split(".")[:2])


def package_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, targets in g.items():
        here = package_of(name)
        out.setdefault(here, set()).update(t for t in map(package_of, targets) if t != here)
    return out


def closing_imports(g: dict[str, set[str]], cycle: list[str]) -> list[str]:
    """The module imports between the packages of one package cycle."""
    members = set(cycle)
    return sorted(
        f"{name} -> {t}"
        for name, targets in g.items()
        for t in targets
        if package_of(name) in members and package_of(t) in members and package_of(t) != package_of(name)
    )


def main(argv: list[str]) -> int:
    root = ROOT
    if "--root" in argv:
        root = Path(argv[argv.index("--root") + 1])
    g = graph(root)
    if "--edges" in argv:
        for name in sorted(g):
            print(f"{name} -> {', '.join(sorted(g[name])) or '-'}")
    found = cycles(g)
    print(f"{len(g)} modules, {sum(len(v) for v in g.values())} import edges, {len(found)} cycle(s)")
    for c in found:
        print("cycle: " + " <-> ".join(c))
    pg = package_graph(g)
    package_cycles = cycles(pg)
    print(f"{len(pg)} packages, {sum(len(v) for v in pg.values())} import edges, {len(package_cycles)} cycle(s)")
    for c in package_cycles:
        print("package cycle: " + " <-> ".join(c))
        for edge in closing_imports(g, c):
            print(f"  {edge}")
    return 1 if found or package_cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
