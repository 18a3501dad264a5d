"""The project's import graph: every import between its modules (function-level ones included), its cycles, and
its upward imports (a lower layer importing a higher one).

    python scripts/import_graph.py            # prints the layers, the edges between packages, and any problem
    python scripts/import_graph.py --dot      # the module graph in Graphviz dot

Layers, bottom to top: pipeline (the stages) < student (trains from their artifacts) < toy (the embedded fixtures,
built with both) < flows (orchestrates stages and fixtures) < bench (measures everything). A module may import its
own layer and the ones below. Exit status 1 when there is a cycle or an upward import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "student", "toy", "flows", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((REPO / layer).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it (a `from a.b import c` counts a.b.c when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a cycle's members."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if layer(b) > layer(a))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    edges = graph()
    if "--dot" in argv:
        print("digraph imports {")
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
        return 0
    between = {}
    for a, targets in edges.items():
        for b in targets:
            key = (a.split(".")[0], b.split(".")[0])
            if key[0] != key[1]:
                between[key] = between.get(key, 0) + 1
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports; layers (bottom to top): "
          + " < ".join(LAYERS))  # fmt: skip
    for (a, b), n in sorted(between.items(), key=lambda kv: (LAYERS.index(kv[0][0]), LAYERS.index(kv[0][1]))):
        print(f"  {a} -> {b}: {n}")
    found_cycles, found_upward = cycles(edges), upward(edges)
    for comp in found_cycles:
        print("cycle: " + " <-> ".join(comp))
    for a, b in found_upward:
        print(f"upward import: {a} imports {b}")
    if not found_cycles and not found_upward:
        print("no cycle, no upward import")
    return 1 if found_cycles or found_upward else 0


if __name__ == "__main__":
    sys.exit(main())
