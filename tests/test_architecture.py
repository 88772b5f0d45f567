"""The package's shape: no import circle, and each run-directory file name written down in one module only.

Both read the source (ast), not a running interpreter, so they count the imports inside functions too: a circle
through a deferred import is still two modules that cannot be understood one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semhinet_tf"
RUN_DIR_HOME = PACKAGE / "artifacts" / "run.py"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports, anywhere in the file (a package import counts as its
    __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    for name in modules:  # importing a.b.c runs a/__init__ and a/b/__init__ first: not an edge we choose
        graph[name] -= {p for p in modules if name.startswith(p + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "semhinet_tf.workflow" in graph and graph["semhinet_tf.cli"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def test_run_directory_file_names_are_written_down_once():
    """config.json, split.json, qat.h5 ...: spelled in artifacts/run.py only; everything else uses its names."""
    from semhinet_tf.artifacts import run

    names = {v for k, v in vars(run).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert {"config.json", "split.json", "qat.h5", "float.keras", "model_int8.tflite"} <= names
    keras_own = {"safe_load.py": {"config.json"}}  # KERAS_ARCHIVE_CONFIG: the config inside a .keras zip
    offenders = {str(p.relative_to(PACKAGE)): sorted(names & _string_literals(p)
                                                     - keras_own.get(str(p.relative_to(PACKAGE)), set()))
                 for p in PACKAGE.rglob("*.py") if p != RUN_DIR_HOME}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders


def test_every_cli_option_has_a_help_text():
    """Issue 23.4: walk the click tree; an option without help is one a person has to guess."""
    import click

    from semhinet_tf.cli import main

    def walk(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    missing = [f"{path} {param.opts[0]}" for path, command in walk(main, "semhinet") for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
               and param.opts[0] not in ("--help", "--version")]
    commands = [path for path, _ in walk(main, "semhinet")]
    assert len(commands) >= 10, commands
    assert not missing, missing
