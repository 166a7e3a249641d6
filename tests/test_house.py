"""The shape of the package: module-level imports form no cycle, and every command has a Python call."""

import ast
from pathlib import Path

import runner

PACKAGE = Path(runner.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """runner module -> the runner modules it imports at module level (not inside functions)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if (PACKAGE / f"{d}.py").exists()}
    return graph


def test_module_imports_have_no_cycle():
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])
    assert "jobdir" in graph and "jobs" not in graph["jobdir"] and "worker" not in graph["jobdir"]


def test_every_job_command_is_a_python_call():
    from runner.cli import cli

    for name in ("status", "cancel", "retry", "repair", "report", "submit", "work", "run"):
        assert name in cli.commands
        assert callable(getattr(runner, name)), name
    assert callable(runner.load_results) and callable(runner.read_errors) and callable(runner.open_job)
