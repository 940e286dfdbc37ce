"""The package's layers: each imports only the layers below it (modeling < engine < methods < runner < benchmarks
< tools), the bottom (errors, config, data, evaluation) imports none of them, and no module is over 450 lines.
Read from the source with ast, so a lazy import inside a function counts too. (That nothing but lgd-demo imports
the demo is tests/test_demo.py's.)"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["modeling", "engine", "methods", "runner", "benchmarks", "tools"]
BOTTOM = {"errors", "config", "data", "evaluation"}
FREE = {"__init__", "configs", "demo"}  # the package's facade, config files (they may name any part), the demo


def _modules(package):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), path


def _layer(module_path):
    """The layer of a module path relative to the repository (lgd/<layer>/... or lgd/<layer>.py)."""
    parts = module_path.replace(os.sep, "/").split("/")
    return parts[1].removesuffix(".py") if parts[0] == "lgd" and len(parts) > 1 else None


def _imported_layers(path, module_path):
    """The lgd layers a file imports, absolute (lgd.x) or relative (from ..x / from . import x)."""
    tree = ast.parse(open(path).read())
    here = module_path.replace(os.sep, "/").removesuffix(".py").split("/")
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                names = [".".join(target)] if node.module else [".".join(target + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lgd" and len(parts) > 1:
                found.add(parts[1])
    return found


def _violations(modules):
    bad = []
    for module_path, path in modules:
        layer = _layer(module_path)
        if layer is None or layer in FREE:
            continue
        for other in _imported_layers(path, module_path) - {layer}:
            if layer in BOTTOM and other in ORDER:
                bad.append(f"{module_path} ({layer}, bottom) imports lgd.{other}")
            elif layer in ORDER and other in ORDER and ORDER.index(other) > ORDER.index(layer):
                bad.append(f"{module_path} ({layer}) imports lgd.{other}, a layer above it")
    return bad


def test_no_module_imports_a_layer_above_it():
    assert _violations(_modules("lgd")) == []


def test_a_planted_upward_import_is_found(tmp_path):
    planted = tmp_path / "lgd" / "engine" / "bad.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def f():\n    from ..runner import train\n    import lgd.tools.cli\n")
    found = _violations([("lgd/engine/bad.py", str(planted))])
    assert sorted(found) == ["lgd/engine/bad.py (engine) imports lgd.runner, a layer above it",
                             "lgd/engine/bad.py (engine) imports lgd.tools, a layer above it"]


@pytest.mark.parametrize("package", ["lgd", "lgd_ops", "benchmarks"])
def test_no_module_over_450_lines(package):
    long = [f"{m}: {sum(1 for _ in open(p))}" for m, p in _modules(package) if sum(1 for _ in open(p)) > 450]
    assert long == []


def test_import_lgd_has_no_side_effects():
    """`import lgd` imports neither torch nor detectron2 and installs no warning filter; the re-exported names
    still resolve."""
    import subprocess
    import sys

    code = ("import sys, warnings; before = list(warnings.filters); import lgd; "
            "assert warnings.filters == before, 'warning filters changed'; "
            "assert 'torch' not in sys.modules and 'detectron2' not in sys.modules, 'heavy imports'; "
            "from lgd import LGDDistiller, PackedLabels; print(LGDDistiller.__name__, PackedLabels.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.sep)
    assert out.returncode == 0 and out.stdout.split() == ["LGDDistiller", "PackedLabels"], out.stderr[-500:]
