"""The project's modules import each other without cycles, and each imports in a fresh interpreter.

The graph counts every import statement in a module, also those inside functions: a deferred import is
the usual way a cycle is hidden, and it still makes the two modules depend on each other. Imports under
`if TYPE_CHECKING:` never run and are left out.
"""
import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"eqm": ROOT / "eqm", "eqm_kernels": ROOT / "kernels", "eqm_bench": ROOT / "bench"}


def project_modules():
    """{dotted module name: file} for every .py file of the three packages."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _runtime_imports(tree):
    """Import nodes of a module, skipping the bodies of `if TYPE_CHECKING:` blocks."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _targets(node, module, is_package, mods):
    """The project modules one import statement loads: `from p import m` needs p.m if that is a module, else p."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in mods:  # `import eqm.x.y` of a function-less path resolves to the module
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph(mods):
    """{module: sorted project modules it imports anywhere in its body}."""
    graph = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = sorted({t for node in _runtime_imports(tree)
                                for t in _targets(node, module, path.name == "__init__.py", mods)})
    return graph


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in graph.get(v, ()):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_find_cycle_sees_a_deferred_import_cycle(tmp_path):
    """The checker itself: a cycle hidden in a function body is found and named."""
    (tmp_path / "a.py").write_text("import os\nfrom pkg import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.a import x\n    return x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    mods = {f"pkg.{n}": tmp_path / f"{n}.py" for n in "abc"}
    graph = import_graph(mods)
    assert graph == {"pkg.a": ["pkg.b"], "pkg.b": ["pkg.a"], "pkg.c": []}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({"pkg.a": ["pkg.b"], "pkg.b": [], "pkg.c": ["pkg.a"]}) is None


# Cycles left to other work, as (a, b) pairs; the test below fails as soon as one is gone, so an entry cannot
# outlive it. None left: eqm.runtime is a leaf that eqm.execution builds on.
PENDING = []


def test_no_import_cycles():
    graph = import_graph(project_modules())
    assert len(graph) > 40 and graph["eqm.train"], "the scan found too few modules or imports"
    for a, b in PENDING:
        assert b in graph[a] and a in graph[b], f"{a} <-> {b} is no longer a cycle: delete it from PENDING"
        graph[a].remove(b)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


IMPORT_ALL = """
import importlib, json, sys
done, skipped, failed = [], {}, {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        done.append(name)
    except ModuleNotFoundError as e:  # an optional extra that is not installed here
        if e.name and e.name.partition(".")[0] in ("eqm", "eqm_kernels", "eqm_bench"):
            failed[name] = repr(e)
        else:
            skipped[name] = e.name
    except Exception as e:
        failed[name] = repr(e)
print(json.dumps(dict(done=done, skipped=skipped, failed=failed)))
"""


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module imports (in one new process, in sorted order); a missing optional extra is a named skip."""
    mods = sorted(m for m in project_modules() if not m.endswith("__main__"))
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL, *mods], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["failed"], f"modules that do not import: {result['failed']}"
    for module, missing in result["skipped"].items():
        print(f"skipped {module}: needs the optional package {missing!r}")
    assert len(result["done"]) > 40
