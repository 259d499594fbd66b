"""The package's modules import each other in one direction: no circle of imports.

A circle works only while every module in it reads the others' names late enough (at call time, or
after they are defined), so a reordering elsewhere turns it into an ImportError; it also means the
modules cannot be read or tested one at a time. Imports inside functions count: they close the same
circle, only later.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "densecl_fast"
# where each package's source lies: kernels/ installs as densecl_fast.kernels (setup.py)
ROOTS = {PACKAGE: os.path.join(REPO, "densecl_fast"), f"{PACKAGE}.kernels": os.path.join(REPO, "kernels")}


def package_modules(roots: dict[str, str]) -> dict[str, str]:
    """{dotted module name: path} of every module under `roots` (a package is its __init__.py)."""
    mods = {}
    for pkg, root in roots.items():
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            rel = os.path.relpath(d, root)
            parts = pkg.split(".") + ([] if rel == "." else rel.split(os.sep))
            if "__init__.py" not in files:
                continue
            for f in sorted(files):
                if f.endswith(".py"):
                    name = parts if f == "__init__.py" else parts + [f[:-3]]
                    mods[".".join(name)] = os.path.join(d, f)
    return mods


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its body."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package relative imports start from

    def owner(dotted: str) -> str | None:  # the longest prefix that is one of our modules
        parts = dotted.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from .pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{prefix}.{a.name}" for a in node.names]
            targets = [t if t in modules else prefix for t in targets]
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                m = owner(t)
                if m and m != name:
                    found.add(m)
    return found


def import_graph(roots=ROOTS) -> dict[str, set[str]]:
    modules = package_modules(roots)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour, stack = {}, []

    def visit(n):
        colour[n] = "grey"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == "grey":
                return stack[stack.index(m):] + [m]
            if m not in colour:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        colour[n] = "black"
        return None

    for n in sorted(graph):
        if n not in colour:
            c = visit(n)
            if c:
                return c
    return None


def test_the_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "densecl_fast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (pkg / "c.py").write_text("import densecl_fast.a\nfrom densecl_fast import sub\n")
    graph = import_graph({PACKAGE: str(pkg)})
    assert graph["densecl_fast.a"] == {"densecl_fast.sub.b"}
    assert graph["densecl_fast.sub.b"] == {"densecl_fast.a"}
    assert graph["densecl_fast.c"] == {"densecl_fast.a", "densecl_fast.sub"}
    assert find_cycle(graph) == ["densecl_fast.a", "densecl_fast.sub.b", "densecl_fast.a"]
    assert find_cycle({k: v - {"densecl_fast.a"} for k, v in graph.items()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "densecl_fast.kernels.dispatch" in graph and "densecl_fast.trainer" in graph
    assert "densecl_fast.kernels.dispatch" in graph["densecl_fast.kernels"]  # the edges are seen at all
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_kernels_import_nothing_of_the_model_they_serve():
    """kernels/ sits below the model: the model calls the kernels, never the other way round (a tool
    that needs both, as the AOT table's forward of the model, lives in perf/)."""
    kernels = f"{PACKAGE}.kernels"
    graph = import_graph()
    above = {m: sorted(d for d in deps if d != kernels and not d.startswith(kernels + "."))
             for m, deps in graph.items() if m == kernels or m.startswith(kernels + ".")}
    assert not {m: d for m, d in above.items() if d}, above
