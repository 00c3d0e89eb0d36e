"""The package's import graph: no cycle, and each layer imports only what sits below it.

Read from the source with `ast`, function-local imports included: a lazy import inside a function is
still a dependency, and an import cycle hidden in one is still a cycle. So is a module loaded by name
(`importlib.import_module("a.b")`, `__import__("a.b")`; an f-string name counts as its literal head,
`f"a.b.{name}"` as a.b)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tldr_tasks"

# (importer, what it must not import, why); a name covers the module and everything below it
RULES = (
    ("tldr_tasks.stages", "tldr_tasks.runner", "stages know nothing of the executor"),
    ("tldr_tasks.stages", "tldr_tasks.cli", "stages know nothing of the command line"),
    ("tldr_tasks.pipeline", "tldr_tasks.stages", "the spec that DAG parsing reads sits below the stages"),
    ("tldr_tasks.data", "tldr_tasks.models", "the data layer does not depend on a model"),
    ("tldr_tasks.data", "tldr_tasks.runner", "the data layer knows nothing of the executor"),
    ("tldr_tasks.data", "tldr_tasks.cli", "the data layer knows nothing of the command line"),
)
LOADERS = ("import_module", "__import__")  # importlib.import_module(name), import_module(name), __import__(name)


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package, packages' __init__ included."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def loaded_by_name(node: ast.Call) -> str | None:
    """The module a call to importlib.import_module or __import__ names with a literal: the string, or an
    f-string's literal head up to its last dot; None for any other call or a name known only at run time."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in LOADERS or not node.args:
        return None
    name = node.args[0]
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
        return name.value
    if isinstance(name, ast.JoinedStr) and name.values and isinstance(name.values[0], ast.Constant):
        return name.values[0].value.rpartition(".")[0] or None
    return None


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its file. `from a.b import c`
    is module a.b.c when that is a module, else a.b (c is a name defined in it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, one level up per extra dot
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif isinstance(node, ast.Call) and (loaded := loaded_by_name(node)):
            targets = [loaded]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name below a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    files = module_files(package)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a layering rule, as 'importer -> imported (why)'."""
    return [f"{module} -> {target} ({why})"
            for importer, forbidden, why in RULES
            for module, targets in sorted(graph.items()) if within(module, importer)
            for target in sorted(targets) if within(target, forbidden)]


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_layer_imports_only_what_sits_below_it():
    assert broken_rules(import_graph()) == []


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "tldr_tasks.storage" in graph["tldr_tasks.runner"]  # from tldr_tasks import storage
    assert "tldr_tasks.pipeline" in graph["tldr_tasks.runner"]  # from tldr_tasks.pipeline import STAGES
    assert "tldr_tasks.content" in graph["tldr_tasks.runner"]  # inside a function
    assert "tldr_tasks.stages.embed" in graph["tldr_tasks.stages.kmeans"]  # from tldr_tasks.stages import embed
    assert "tldr_tasks.stages" in graph["tldr_tasks.runner"]  # importlib.import_module(f"tldr_tasks.stages.{...}")


def test_relative_and_dotted_imports_resolve_to_modules(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__", "a", "b", "sub/__init__", "sub/c"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text("from . import b\nimport pkg.sub.c\n")
    (package / "sub" / "c.py").write_text("def f():\n    from ..b import thing\n    from pkg.sub import c\n")
    (package / "b.py").write_text("import importlib\nfrom importlib import import_module\n\n\ndef f(name):\n"
                                  "    importlib.import_module('pkg.a')\n    __import__('pkg.sub.c.thing')\n"
                                  "    import_module(f'pkg.sub.{name}')\n    importlib.import_module(name)\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.b"}  # a module importing itself is no edge
    assert graph["pkg.b"] == {"pkg.a", "pkg.sub.c", "pkg.sub"}  # loaded by name; a name held in a variable is not seen


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_the_rules_catch_a_planted_violation():
    planted = {"tldr_tasks.stages.embed": {"tldr_tasks.runner", "tldr_tasks.contract"},
               "tldr_tasks.pipeline": {"tldr_tasks.stages.embed"},
               "tldr_tasks.data.stream": {"tldr_tasks.models.captioner", "tldr_tasks.cli"},
               "tldr_tasks.data.shards": {"tldr_tasks.runner"},
               "tldr_tasks.runner": {"tldr_tasks.stages.embed"}}  # the executor may load stages
    assert [line.split(" (")[0] for line in broken_rules(planted)] == [
        "tldr_tasks.stages.embed -> tldr_tasks.runner", "tldr_tasks.pipeline -> tldr_tasks.stages.embed",
        "tldr_tasks.data.stream -> tldr_tasks.models.captioner", "tldr_tasks.data.shards -> tldr_tasks.runner",
        "tldr_tasks.data.stream -> tldr_tasks.cli"]
