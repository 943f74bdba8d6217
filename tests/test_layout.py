"""The layering rule, checked on the code itself: every room imports only the rooms below it, no module imports
another module's private names, and no two modules import each other (directly or round a longer circle)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("models", "training", "service", "pupil", "deploy")
MAY_IMPORT = {  # room -> the rooms it may import (besides itself)
    "models": set(),
    "training": {"models"},
    "service": {"models"},
    "pupil": {"models", "training", "service"},
    "deploy": {"models", "pupil"},
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for room in ROOMS for p in (ROOT / room).glob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth, relative ones resolved."""
    package = name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}" if base else package
            out.append((base, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names in _imports(name, path):
            for t in [target] + [f"{target}.{n}" for n in names]:
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def test_each_room_imports_only_the_rooms_below_it():
    bad = []
    for name, path in _modules().items():
        room = name.split(".")[0]
        for target, _ in _imports(name, path):
            other = target.split(".")[0]
            if other in ROOMS and other != room and other not in MAY_IMPORT[room]:
                bad.append(f"{name} imports {target}")
    assert bad == []


def test_no_private_names_cross_a_module_boundary():
    mods = _modules()
    bad = [f"{name} takes {n} from {target}" for name, path in mods.items() for target, names in _imports(name, path)
           if target in mods and target != name for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles


def test_no_import_circles():
    assert find_cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    graph = _graph()
    assert "models.spec" in graph["models.artifact"]
    graph["models.spec"] = graph["models.spec"] | {"models.artifact"}  # as if spec imported the artifact back
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1] and {"models.spec", "models.artifact"} <= set(cycles[0])


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
