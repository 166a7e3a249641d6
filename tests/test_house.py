"""The shape of the package: module-level imports form no cycle, every command has a Python call, and every
function reads in one screen."""

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


# Each `runner` command and the public call it is a thin layer over (score and embed are `run` with their params).
COMMAND_CALLS = {
    "status": "status", "cancel": "cancel", "retry": "retry", "repair": "repair", "report": "report",
    "submit": "submit", "work": "work", "run": "run", "score": "run", "embed": "run", "generate": "generate",
    "watch": "watch", "results": "export_results", "run-batch": "run_batch",
}  # fmt: skip


def test_every_command_is_a_python_call():
    from runner.cli import cli

    assert set(cli.commands) == set(COMMAND_CALLS), "a new command needs its public call here (and in runner)"
    for call in COMMAND_CALLS.values():
        assert call in runner.__all__ and callable(getattr(runner, call)), call
    assert callable(runner.load_results) and callable(runner.read_errors) and callable(runner.open_job)


def code_lines(node: ast.FunctionDef, source: list[str]) -> int:
    """Lines of a function's body that are code: no docstring, blank line or comment line."""
    body = node.body
    first = body[0]
    is_doc = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    start = first.end_lineno + 1 if is_doc else first.lineno
    lines = source[start - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_every_function_reads_in_one_screen():
    """No function (or class-making function) of the package over 60 lines of code."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node, source) > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({code_lines(node, source)} lines)")
    assert not long, long
