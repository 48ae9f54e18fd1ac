"""The package layout: the import graph (read from the source with ``ast``, function-local imports
included) is acyclic, packages import downward only, and no private name crosses a module."""

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("sdattn", "probing", "editing", "evaluation", "experiments", "toyworld")
# Who may import whom: sdattn (core) ← probing, editing ← evaluation ← experiments. toyworld (the toy
# world's renderer, model, CLIP and edit benchmark) builds on the core, the probes' prompts, the editors and
# the metrics; evaluation reaches it only through what experiments/tasks inject.
ALLOWED = {
    "sdattn": set(),
    "probing": {"sdattn"},
    "editing": {"sdattn"},
    "evaluation": {"sdattn", "probing", "editing"},
    "toyworld": {"sdattn", "probing", "editing", "evaluation"},
    "experiments": {"sdattn", "probing", "editing", "evaluation", "toyworld"},
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """({module: project modules it imports}, [(module, source module, private name)])."""
    files = {_module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    private = []

    def known(name: str) -> str | None:  # "pkg.mod.attr" → the module it names
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [(f"{base}.{a.name}" if known(f"{base}.{a.name}") == f"{base}.{a.name}" else base, a.name)
                           for a in node.names]
            else:
                continue
            for target, name in targets:
                dep = known(target)
                if dep is None or dep == mod:
                    continue
                edges[mod].add(dep)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append((mod, dep, name))
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_import_graph_is_acyclic_and_downward():
    edges, private = import_graph()
    assert len(edges) > 40 and edges["evaluation.runner"] >= {"evaluation.records", "evaluation.metrics"}
    assert find_cycle(edges) is None, find_cycle(edges)
    upward = sorted((m, d) for m, deps in edges.items() for d in deps
                    if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert upward == []
    assert private == []


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_editor_in_evaluation_and_no_method_registry():
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in (ROOT / "evaluation").rglob("*.py")}
    # an editor is a module-level edit_<name>(pipe, example, seed, ...) (a checker's edit_ok method is not one)
    assert not [(p, f.name) for p, tree in trees.items() for f in tree.body
                if isinstance(f, ast.FunctionDef) and f.name.startswith("edit_")]
    for path in (ROOT / "configs" / "method").glob("*.yaml"):
        assert "_target_: editing." in path.read_text(encoding="utf-8"), path


TASKS = "experiments.tasks."
# A task composes library calls: its config in, files and a result dict out. Past this many lines it holds
# library logic that another task, perf, a notebook or the app would then import from it (issue 22).
TASK_LINE_BUDGET = 120


def script_imports(path: Path) -> set[str]:
    """The modules a script outside the packages (a notebook's .py) imports, by name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def task_importers(edges: dict[str, set[str]], scripts: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, task module) for every import of a task module by another module of the packages (a task
    included) or by a script: tasks are run only by ``experiments.run`` (``importlib``, by name)."""
    found = [(m, d) for m, deps in edges.items() for d in deps if d.startswith(TASKS) and d != m]
    found += [(s, n) for s, names in scripts.items() for n in names if n.startswith(TASKS)]
    return sorted(found)


def test_no_task_imports_a_task_and_only_the_entry_point_runs_them():
    edges, _ = import_graph()
    scripts = {p.name: script_imports(p) for p in (ROOT / "notebooks").glob("*.py")}
    assert len(scripts) >= 3 and "editing.methods.build_method" in scripts["03_fpe_and_baselines.py"]
    assert task_importers(edges, scripts) == []


def test_the_task_check_can_fail():
    edges = {"experiments.tasks.merge": {"experiments.tasks.benchmark", "evaluation.merge"},
             "experiments.perf": {"experiments.tasks.probe"}, "experiments.tasks.probe": set()}
    assert task_importers(edges, {"03.py": {"experiments.tasks.benchmark.build_method"}}) == [
        ("03.py", "experiments.tasks.benchmark.build_method"), ("experiments.perf", "experiments.tasks.probe"),
        ("experiments.tasks.merge", "experiments.tasks.benchmark")]


def test_task_modules_stay_short():
    tasks = (ROOT / "experiments" / "tasks").glob("*.py")
    lines = {p.stem: len(p.read_text(encoding="utf-8").splitlines()) for p in tasks}
    assert len(lines) > 10 and "claims" in lines
    assert {name: n for name, n in lines.items() if n > TASK_LINE_BUDGET} == {}
