"""The package's import direction (docs/design.md): no module imports a layer above its own."""

import ast
import subprocess
import sys
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
    "gmmt.inference": ("gmmt.config", "gmmt.data", "gmmt.model", "gmmt.saved_model",
                       "gmmt.evaluation", "gmmt.inference"),
    "gmmt.training": ("gmmt.config", "gmmt.data", "gmmt.model", "gmmt.evaluation",
                      "gmmt.saved_model", "gmmt.training"),
}


def gmmt_imports(path: Path) -> set[str]:
    """Every gmmt module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            # gmmt imports absolutely, so a relative import cannot hide a layer it reaches
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.add(node.module or "")
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
    tops = {"gmmt", "gmmt.run", "gmmt.evaluate", "gmmt.predict", "gmmt.launcher"}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        assert name in tops or any(name == layer or name.startswith(layer + ".")
                                   for layer in ALLOWED), name


def test_benchmarks_use_the_library_not_the_command_line_modules() -> None:
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        clis = {n for n in gmmt_imports(path)
                if n in ("gmmt.run", "gmmt.evaluate", "gmmt.predict")}
        assert not clis, f"{path.name} imports {clis}"


def test_configuration_does_not_load_torch() -> None:
    script = ("import sys, gmmt.config.presets, gmmt.config.registry, gmmt.run\n"
              "gmmt.config.presets.get_preset_config('standard')\n"
              "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip() == "False"
