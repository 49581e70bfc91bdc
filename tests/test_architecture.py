"""The package's layout as tests: layers only import downwards, no import cycles, commands never import
commands, no module over 600 lines (docs/architecture.md draws the layers).

The imports are read from the source (``ast``), so a function-level import counts like a top-level one:
hiding an edge inside a function does not make it go away. ``if TYPE_CHECKING:`` imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "video_ktr"

# lowest first; a module may import its own layer and the layers before it
LAYERS = ("utils", "core", "data", "model", "evaluation", "training", "analysis", "commands")
ROOT = "video_ktr"  # the package itself (its version): below every layer, imports nothing
TOP = {"video_ktr.cli", "video_ktr.__main__"}  # the entry points, above every layer
MAX_LINES = 600

# Modules still being split by their owners (issue 15), each to be emptied by that owner.
# test_allow_lists_hold_only_modules_that_still_need_them keeps this list exact.
OVERSIZE_ALLOWED: set[str] = set()
# Import cycles still to be broken by their owner; same rule.
CYCLES_ALLOWED: list[list[str]] = []
# (importer, imported) pairs that break the layering and are being moved by their owner; same rule.
UPWARD_ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in: the longest prefix that is a module of the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from a.b import c` imports module a.b.c when c is one, else the name c of a.b
            names = [f"{prefix}.{a.name}" for a in node.names]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _layer(module: str) -> int | None:
    if module == ROOT:
        return -1
    if module in TOP:
        return None
    return LAYERS.index(module.split(".")[1])


def _upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for module, targets in graph.items():
        for target in targets:
            if target in TOP and module not in TOP:
                bad.add((module, target))
                continue
            lm, lt = _layer(module), _layer(target)
            if lm is not None and lt is not None and lt > lm:
                bad.add((module, target))
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return found


def _line_counts() -> dict[str, int]:
    return {m: len(p.read_text().splitlines()) for m, p in _modules().items()}


def test_every_module_lies_in_a_layer():
    unknown = [m for m in _modules() if m != ROOT and m not in TOP and m.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_the_package_root_imports_nothing_of_the_package():
    assert _graph()[ROOT] == set()


def test_no_import_cycles():
    cycles = [c for c in _cycles(_graph()) if c not in CYCLES_ALLOWED]
    assert not cycles, "import cycles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_module_imports_a_higher_layer():
    bad = sorted(_upward_imports(_graph()) - UPWARD_ALLOWED)
    assert not bad, f"imports of a higher layer (order {' < '.join(LAYERS)}): " + ", ".join(
        f"{a} -> {b}" for a, b in bad
    )


def test_commands_never_import_commands():
    graph = _graph()
    bad = sorted(
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if m.startswith("video_ktr.commands.") and t.startswith("video_ktr.commands.")
    )
    assert not bad, "a command imports another command (move what they share down a layer): " + ", ".join(
        f"{a} -> {b}" for a, b in bad
    )


def test_no_module_over_the_line_limit():
    over = {m: n for m, n in _line_counts().items() if n > MAX_LINES and m not in OVERSIZE_ALLOWED}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_allow_lists_hold_only_modules_that_still_need_them():
    """An allow-listed module that is already fine must leave the list, so the list cannot go stale."""
    counts = _line_counts()
    stale = sorted(m for m in OVERSIZE_ALLOWED if counts.get(m, 0) <= MAX_LINES)
    assert not stale, f"remove from OVERSIZE_ALLOWED (now within {MAX_LINES} lines or gone): {stale}"
    stale_edges = sorted(UPWARD_ALLOWED - _upward_imports(_graph()))
    assert not stale_edges, f"remove from UPWARD_ALLOWED (the import is gone): {stale_edges}"
    cycles = _cycles(_graph())
    stale_cycles = [c for c in CYCLES_ALLOWED if c not in cycles]
    assert not stale_cycles, f"remove from CYCLES_ALLOWED (the cycle is gone or changed): {stale_cycles}"


# The checks themselves, on small hand-made graphs: each must be able to fail.


def test_cycle_finder_reports_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("importer", "imported", "upward"),
    [
        ("video_ktr.core.loss", "video_ktr.model.rollout", True),
        ("video_ktr.model.rollout", "video_ktr.core.loss", False),
        ("video_ktr.training.grpo", "video_ktr.training.checkpoint", False),
        ("video_ktr.evaluation.engine", "video_ktr.training.grpo", True),
        ("video_ktr.commands.eval", "video_ktr.cli", True),
        ("video_ktr.cli", "video_ktr.commands.eval", False),
        ("video_ktr.evaluation.protocol", "video_ktr", False),
    ],
)
def test_layer_check_flags_imports_of_higher_layers(importer, imported, upward):
    assert bool(_upward_imports({importer: {imported}})) == upward


def test_import_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "video_ktr"
    (pkg / "core").mkdir(parents=True)
    for name in ("__init__.py", "core/__init__.py", "core/a.py", "core/b.py", "core/c.py"):
        (pkg / name).touch()
    source = "import os\ndef f():\n    from video_ktr.core import b\n    from . import c\n    from .b import x\n"
    path = pkg / "core" / "a.py"
    path.write_text(source)
    modules = {"video_ktr.core.a": path, "video_ktr.core.b": pkg / "core/b.py", "video_ktr.core.c": pkg / "core/c.py",
               "video_ktr.core": pkg / "core/__init__.py", "video_ktr": pkg / "__init__.py"}
    assert _imports("video_ktr.core.a", path, modules) == {"video_ktr.core.b", "video_ktr.core.c"}
