"""The package is layered: a module imports (at its top) only modules of its own layer or below, and every
module imports on its own (no cycle). ARCHITECTURE.md describes the layers; a new module is placed here."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SOURCE / "layerfold"

# The layers are the package's folders, lowest first: a module imports (at its top) only from its own folder or a
# folder before it. ``layerfold/__init__`` is core (its import of the Auto classes at the end is the one upward
# import, on purpose); ``__main__`` is the command.
FOLDERS = ["core", "operations", "evaluation", "engine", "analysis", "checkpoints", "folding", "methods", "heal",
           "jobs", "cli"]
LAYERS = {folder: [f"layerfold.{folder}", f"layerfold.{folder}.*", f"layerfold.{folder}.*.*",
                   f"layerfold.{folder}.*.*.*"] for folder in FOLDERS}
LAYERS["core"].append("layerfold")
LAYERS["cli"].append("layerfold.__main__")


def test_the_folders_are_the_layers():
    """Every folder of the package is a layer, and every module is in a folder (the root holds only the package's
    ``__init__`` and ``__main__``)."""
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(FOLDERS)
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def layer_of(name: str) -> int:
    """The layer of a module: an exact entry first, then the most specific pattern."""
    best = None
    for level, patterns in enumerate(LAYERS.values()):
        for pattern in patterns:
            parts, wanted = name.split("."), pattern.split(".")
            if len(parts) == len(wanted) and all(w in ("*", p) for w, p in zip(wanted, parts)):
                score = sum(w != "*" for w in wanted)
                if best is None or score > best[0]:
                    best = (score, level)
    assert best is not None, f"{name} is in no layer: add it to LAYERS in tests/test_layers.py and ARCHITECTURE.md"
    return best[1]


def top_level_imports(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("layerfold"):
                # ``from . import x`` may name a module x
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if (SOURCE / (candidate.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("layerfold")}
    return found


def test_every_module_is_in_a_layer_and_imports_nothing_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target in top_level_imports(path):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({list(LAYERS)[layer_of(name)]}) imports {target} ({list(LAYERS)[layer_of(target)]})")
    assert not upward, "\n".join(upward)


def test_every_module_imports_alone():
    """Each module imported first, with no other layerfold module loaded: an import cycle fails here."""
    script = f"""
import importlib, json, sys
import torch, transformers  # loaded once; only layerfold's modules are dropped between imports
failed = {{}}
for name in {[m for m in modules() if m != "layerfold.__main__"]!r}:  # __main__ runs the command
    for loaded in [m for m in sys.modules if m == "layerfold" or m.startswith("layerfold.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{{type(err).__name__}}: {{err}}"
print("\\n" + json.dumps(failed))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=SOURCE, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}, result.stdout[-2000:]


# Modules over 500 lines, each with its size as a ceiling and why (none now).
LONG_MODULES: dict[str, tuple[int, str]] = {}


def test_no_module_over_500_lines_and_no_function_over_80_without_a_reason():
    """A function over 80 lines says why in its docstring or in a comment just above it."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        ceiling = LONG_MODULES.get(relative, (500, ""))[0]
        if len(lines) > ceiling:
            too_long.append(f"{relative}: {len(lines)} lines (at most {ceiling})")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                said = (ast.get_docstring(node) or "") + " ".join(lines[max(0, first - 3) : first - 1])
                if "over 80 lines" not in said.lower():
                    too_long.append(f"{relative}: {node.name} is {node.end_lineno - node.lineno + 1} lines, and says not why")
    assert not too_long, "\n".join(too_long)
