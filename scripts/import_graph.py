"""Print the import graph's cycles and pass-to-pass imports (both should be none).

    .venv/bin/python scripts/import_graph.py

`lint-imports` (tests/test_architecture.py) enforces the contracts of pyproject.toml; this script
shows the same facts as plain lists, for reading or for a review: every cycle between modules of
`toolchain` and `runtime_agent`, and every import from one pass module into another. Exit status 1
when either list is not empty.
"""

from __future__ import annotations

import sys

import grimp


def module_cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def pass_to_pass_imports(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    """(importer, imported) pairs where both are pass modules (`toolchain.passes.<group>.<pass>`)."""
    passes = {m for m in graph.modules if m.startswith("toolchain.passes.") and m.count(".") == 3}
    return sorted((importer, imported) for importer in passes
                  for imported in graph.find_modules_directly_imported_by(importer) & passes)


def main() -> int:
    graph = grimp.build_graph("toolchain", "runtime_agent")
    modules = {m for m in graph.modules if m.split(".")[0] in ("toolchain", "runtime_agent")}
    cycles = module_cycles(graph, modules)
    pairs = pass_to_pass_imports(graph)
    print(f"{len(modules)} modules")
    print(f"import cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    print(f"pass-to-pass imports: {len(pairs)}")
    for importer, imported in pairs:
        print(f"  {importer} -> {imported}")
    return 1 if cycles or pairs else 0


if __name__ == "__main__":
    sys.exit(main())
