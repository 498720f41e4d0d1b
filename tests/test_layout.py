"""The house rules of src/peftkit, checked from its source with `ast` (nothing is imported):

- no import cycle between peftkit modules (imports run at import time: module level and class bodies,
  not inside functions, not under `if TYPE_CHECKING:`);
- no private name (`_name`) of one peftkit module used by another (`from peftkit.x import _name`, or
  `x._name` on an imported peftkit module), wherever the import stands;
- no source file over 600 lines and no function over 80 lines;
- the library never imports `peftkit.cli`.

Exceptions stand in ALLOWED below, each with its reason; an entry that is no longer needed fails too,
so the list only shrinks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "peftkit"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

# "path relative to src/peftkit" or "path:qualified function name" -> (the most lines allowed, why).
ALLOWED: dict[str, tuple[int, str]] = {}


@dataclass(frozen=True)
class Module:
    name: str  # peftkit.train.loop
    path: Path
    tree: ast.Module
    lines: int

    @property
    def relative(self) -> str:
        return self.path.relative_to(SOURCE).as_posix()

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _modules() -> dict[str, Module]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = ("peftkit",) + path.relative_to(SOURCE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text(encoding="utf-8")
        found[name] = Module(name, path, ast.parse(text, filename=str(path)), len(text.splitlines()))
    return found


MODULES = _modules()


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: Module, at_import_time: bool):
    """(imported peftkit module, names taken from it, line) for each import of `module`."""

    def visit(node: ast.AST):
        for child in ast.iter_child_nodes(node):
            if at_import_time and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if at_import_time and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (item for stmt in child.orelse for item in visit(ast.Module(body=[stmt], type_ignores=[])))
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("peftkit"):
                        yield alias.name, [], child.lineno
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, child)
                if source.split(".")[0] != "peftkit":
                    continue
                taken = []
                for alias in child.names:
                    if f"{source}.{alias.name}" in MODULES:  # `from peftkit import io`: the module io
                        yield f"{source}.{alias.name}", [], child.lineno
                    else:
                        taken.append(alias.name)
                if taken:
                    yield source, taken, child.lineno
            yield from visit(child)

    yield from visit(module.tree)


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, module in MODULES.items():
        for target, _, _ in _imports(module, at_import_time=True):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a list of names."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A path start -> ... -> start inside `component`, to show where the cycle runs."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for target in sorted(graph[path[-1]] & members):
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                paths.append(path + [target])
    return component  # pragma: no cover


def _functions(module: Module):
    """(qualified name, lines) of every function and method, nested ones too."""

    def visit(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child.end_lineno - child.lineno + 1
                yield from visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(module.tree, "")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# --------------------------------------------------------------------------- the rules


def test_the_source_is_found():
    assert "peftkit.model" in MODULES and "peftkit.train.loop" in MODULES and len(MODULES) > 50


def test_no_import_cycle_between_peftkit_modules():
    graph = _graph()
    cycles = [" -> ".join(_one_cycle(graph, c)) for c in _cycles(graph)]
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    found = []
    for name, module in MODULES.items():
        aliases = {}  # local name -> peftkit module, for `alias._name`
        for target, taken, line in _imports(module, at_import_time=False):
            if target == name:
                continue
            found += [f"{module.relative}:{line} imports {n} from {target}" for n in taken if _is_private(n)]
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("peftkit.") and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != name and _is_private(node.attr)):
                found.append(f"{module.relative}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_library_never_imports_the_cli():
    found = [f"{m.relative}:{line} imports {target}" for name, m in MODULES.items() if not name.startswith("peftkit.cli")
             for target, _, line in _imports(m, at_import_time=False) if target.startswith("peftkit.cli")]
    assert not found, "\n".join(found)


def _too_long() -> dict[str, int]:
    """Every file over MAX_FILE_LINES and every function over MAX_FUNCTION_LINES, with its length."""
    long = {}
    for module in MODULES.values():
        if module.lines > MAX_FILE_LINES:
            long[module.relative] = module.lines
        for function, lines in _functions(module):
            if lines > MAX_FUNCTION_LINES:
                long[f"{module.relative}:{function}"] = lines
    return long


def test_no_file_or_function_is_too_long():
    over = [f"{where}: {lines} lines (limit {MAX_FILE_LINES if ':' not in where else MAX_FUNCTION_LINES})"
            for where, lines in sorted(_too_long().items()) if where not in ALLOWED or lines > ALLOWED[where][0]]
    assert not over, "too long (split it along its seams, or justify it in ALLOWED):\n" + "\n".join(over)


def test_each_allowed_exception_is_justified_and_still_needed():
    long = _too_long()
    for where, (_, reason) in ALLOWED.items():
        assert reason.strip() and "\n" not in reason, f"{where}: give a one-line reason"
        assert where in long, f"{where} is within the limits now: remove it from ALLOWED"


def test_the_checker_sees_what_it_checks():
    # The rules would pass vacuously if the parser missed imports or functions: check them on known cases.
    loop = MODULES["peftkit.train.loop"]
    assert "peftkit.train.checkpoint" in {t for t, _, _ in _imports(loop, at_import_time=True)}
    assert "Trainer.run" in dict(_functions(loop))
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]] and _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
