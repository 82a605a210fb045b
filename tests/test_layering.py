"""The package's import direction (docs/design.md): no module imports a layer above its own."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gmmt"

# layer -> the gmmt modules it may import (prefix match); the CLIs and the package root, which
# re-exports the public names lazily, may import anything.
ALLOWED = {
    "gmmt.config": ("gmmt.config",),
    "gmmt.data": ("gmmt.config", "gmmt.data"),
    "gmmt.model": ("gmmt.config.model", "gmmt.model"),
    "gmmt.saved_model": ("gmmt.config", "gmmt.model"),
    "gmmt.evaluation": ("gmmt.config", "gmmt.data", "gmmt.evaluation", "gmmt.saved_model"),
    "gmmt.training": ("gmmt.config", "gmmt.data", "gmmt.model", "gmmt.evaluation",
                      "gmmt.saved_model", "gmmt.training"),
}


def gmmt_imports(path: Path) -> set[str]:
    """Every gmmt module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "gmmt" or name.startswith("gmmt.")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_its_own(layer: str) -> None:
    root = PACKAGE.joinpath(*layer.split(".")[1:])
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    assert files
    allowed = ALLOWED[layer]
    wrong = {f"{module_name(f)} imports {name}" for f in files for name in gmmt_imports(f)
             if not any(name == a or name.startswith(a + ".") for a in allowed)}
    assert not wrong, sorted(wrong)


def test_every_module_belongs_to_a_layer() -> None:
    tops = {"gmmt", "gmmt.run", "gmmt.evaluate"}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        assert name in tops or any(name == layer or name.startswith(layer + ".")
                                   for layer in ALLOWED), name
