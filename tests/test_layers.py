"""The packages import downward only (../shared/DESIGN.md): model folders are read and written in
components/model, so train does not import compress, and serve imports neither train nor compress;
and no module of components/, pipelines/ or kernels/ is part of an import circle, counting the
imports inside functions too (a lazy import hides a circle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ROOT / "components"
BASE = {"config", "artifacts", "console", "errors", "image", "kfp_io"}  # the modules beside the packages
MAY_IMPORT = {
    "data": BASE,
    "model": BASE | {"data"},
    "train": BASE | {"data", "model"},
    "compress": BASE | {"data", "model", "train"},
    "serve": BASE | {"data", "model"},
    "registry": BASE,
}


def _imports(path: Path) -> set[str]:
    """The components.<name> packages or modules that a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {n.split(".")[1] for n in names if n.startswith("components.") and n.count(".") >= 1}
    return found


def test_every_package_imports_only_the_layers_below_it():
    packages = {p.name for p in COMPONENTS.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(MAY_IMPORT), "a new package: say what it may import"
    wrong = [f"{path.relative_to(COMPONENTS.parent)} imports components.{name}"
             for package in packages for path in sorted((COMPONENTS / package).rglob("*.py"))
             for name in sorted(_imports(path) - MAY_IMPORT[package] - {package})]
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from components.compress.quantize import run\n")
    assert _imports(bad) == {"compress"}


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in ("components", "pipelines", "kernels"):
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _graph(root: Path) -> dict[str, set[str]]:
    """module -> the suite's modules it imports, at any depth of its code (`from a.b import c`
    counts as a.b.c when that is a module, else as a.b)."""
    modules = _modules(root)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {owner(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names}
        graph[name] = deps - {None, name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                part = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    part.append(w)
                    if w == v:
                        break
                if len(part) > 1:
                    out.append(sorted(part))
    return out


def test_no_module_is_part_of_an_import_circle():
    assert _circles(_graph(ROOT)) == []


def test_the_check_sees_a_circle_through_a_lazy_import(tmp_path):
    for package in ("components", "pipelines", "kernels"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "components" / "a.py").write_text("from components.b import x\n")
    (tmp_path / "components" / "b.py").write_text("def x():\n    from components import c\n")
    (tmp_path / "components" / "c.py").write_text("import components.a\n")
    (tmp_path / "pipelines" / "d.py").write_text("from components.a import y\n")  # into it, not part of it
    assert _circles(_graph(tmp_path)) == [["components.a", "components.b", "components.c"]]


def _private_imports(root: Path) -> list[str]:
    """`from <suite module> import _helper` anywhere in the suite: a private helper used across modules."""
    found = []
    for name, path in _modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "components", "pipelines", "kernels") and node.module != name:
                found += [f"{name} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_helpers():
    assert _private_imports(ROOT) == []


def test_the_check_sees_a_private_import(tmp_path):
    (tmp_path / "components").mkdir()
    (tmp_path / "components" / "a.py").write_text("def f():\n    from components.b import _helper\n")
    assert _private_imports(tmp_path) == ["components.a imports components.b._helper"]


PARSER_CALLS = {"ArgumentParser", "add_parser", "add_subparsers", "add_argument", "add_mutually_exclusive_group"}


def _parsers(root: Path) -> list[str]:
    """Where the suite builds a command-line parser outside pipelines/cli.py, the one parser module."""
    found = []
    for name, path in _modules(root).items():
        if name == "pipelines.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if called in PARSER_CALLS:
                    found.append(f"{name}:{node.lineno} calls {called}")
    return found


def test_the_command_line_is_parsed_in_one_module():
    assert _parsers(ROOT) == [], "add the command's arguments to pipelines/cli.py build_parser"


def test_the_check_sees_a_parser_built_elsewhere(tmp_path):
    (tmp_path / "components").mkdir()
    (tmp_path / "components" / "tool.py").write_text(
        "import argparse\n\ndef main():\n    ap = argparse.ArgumentParser()\n    ap.add_argument('--x')\n")
    assert _parsers(tmp_path) == ["components.tool:4 calls ArgumentParser", "components.tool:5 calls add_argument"]
