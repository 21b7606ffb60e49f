"""The shape the code promises (CONTRIBUTING.md): no import circle among product modules, a loop you can read."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("server_app", "client_app", "strategies", "dashboard")


def product_modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}".removesuffix(".__init__"): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Product modules ``path`` imports, type-checking-only imports included (a circle is a circle)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n in known} or ({node.module} & known)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & known
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles: list[str] = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in stack:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in done:
                done.add(dep)
                visit(dep, [*stack, dep], done)

    for name in graph:
        visit(name, [name], {name})
    return sorted(set(cycles))


def test_no_product_module_imports_another_in_a_circle():
    modules = product_modules()
    known = set(modules) | set(PACKAGES)
    graph = {name: imports(path, known) - {name} for name, path in modules.items()}
    assert len(graph) > 30 and graph["server_app.engine"] >= {"server_app.state", "server_app.clocks"}
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_circle_check_sees_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) != []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []


def test_the_engine_loop_stays_readable_in_one_sitting():
    assert len((ROOT / "server_app" / "engine.py").read_text().splitlines()) < 300
