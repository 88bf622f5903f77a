"""The packages import downward only (../shared/DESIGN.md): model folders are read and written in
components/model, so train does not import compress, and serve imports neither train nor compress."""

from __future__ import annotations

import ast
from pathlib import Path

COMPONENTS = Path(__file__).resolve().parents[1] / "components"
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
