"""The layout's rules (docs/architecture.md), read from the code's own imports: no import cycle between the
package's modules, the tuner imports nothing above it, and nothing imports upward into benchmarks or tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_alps"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (at any depth of the file: lazy imports count too)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # "from pkg import module"
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_package_modules_import_each_other_without_a_cycle():
    graph = package_graph()
    faces = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    # a folder's __init__ hands names on; an edge into a folder face is an edge into what it re-exports
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] - faces):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("lower, above", [
    ("peft_alps.tuner", ("peft_alps.localization", "peft_alps.warmup", "peft_alps.demo", "peft_alps.integrations",
                         "peft_alps.cli", "peft_alps_cli")),
    ("peft_alps.localization", ("peft_alps.warmup", "peft_alps.demo", "peft_alps.cli", "peft_alps_cli")),
    ("peft_alps.warmup", ("peft_alps.demo", "peft_alps.cli", "peft_alps_cli")),
    ("peft_alps.scores", ("peft_alps.tuner", "peft_alps.localization", "peft_alps.warmup", "peft_alps.demo")),
    ("peft_alps.layouts", ("peft_alps.tuner", "peft_alps.localization", "peft_alps.warmup", "peft_alps.demo")),
    ("peft_alps.threads", ("peft_alps.tuner", "peft_alps.localization", "peft_alps.warmup", "peft_alps.demo")),
])
def test_no_stage_imports_a_stage_above_it(lower, above):
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name != lower and not name.startswith(lower + "."):
            continue
        wrong = sorted(m for m in imports_of(path) if any(m == a or m.startswith(a + ".") for a in above))
        assert not wrong, f"{path.relative_to(ROOT)} ({lower}) imports {wrong}, which sit above it"


def test_package_and_benchmarks_never_import_tests_and_the_package_never_imports_benchmarks():
    for folder, banned in ((PACKAGE, ("tests", "benchmarks")), (ROOT / "peft_alps_cli", ("tests", "benchmarks")),
                           (ROOT / "benchmarks", ("tests",))):
        for path in folder.rglob("*.py"):
            wrong = sorted(m for m in imports_of(path) if m.split(".")[0] in banned)
            assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_the_rules_see_a_planted_cycle_and_an_upward_import(tmp_path):
    """The oracle itself: a tiny package with a cycle and an upward import is caught."""
    pkg = tmp_path / "peft_alps"
    (pkg / "tuner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tuner" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from peft_alps import b\n")
    (pkg / "b.py").write_text("def f():\n    from peft_alps.a import x\n")
    (pkg / "tuner" / "model.py").write_text("from peft_alps.localization.pad import localize_heads\n")
    saved = globals()["ROOT"], globals()["PACKAGE"]
    globals()["ROOT"], globals()["PACKAGE"] = tmp_path, pkg
    try:
        with pytest.raises(pytest.fail.Exception, match="peft_alps.a -> peft_alps.b -> peft_alps.a"):
            test_package_modules_import_each_other_without_a_cycle()
        with pytest.raises(AssertionError, match="localization"):
            test_no_stage_imports_a_stage_above_it("peft_alps.tuner", ("peft_alps.localization",))
    finally:
        globals()["ROOT"], globals()["PACKAGE"] = saved
