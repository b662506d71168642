"""DESIGN.md section 1: the GUI never loads the ML stack, and the engine never loads Qt."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imports every module of `package` in a fresh interpreter in which `blocked` top-level packages fail to
# import; prints the modules it imported. A blocked import anywhere in the package fails the run.
_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    package, blocked = sys.argv[1], set(sys.argv[2].split(",")) if sys.argv[2] else set()

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} is blocked in this process")
            return None

    sys.meta_path.insert(0, Blocker())
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
    for name in names:
        importlib.import_module(name)
    print("\\n".join(names))
    print("LOADED:" + ",".join(sorted({m.split(".")[0] for m in sys.modules})))
    """
)


def _import_all(package: str, blocked: list[str]) -> tuple[list[str], set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package, ",".join(blocked)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, f"importing {package} failed:\n{result.stderr[-4000:]}"
    lines = result.stdout.strip().splitlines()
    loaded = set(lines[-1].removeprefix("LOADED:").split(","))
    return lines[:-1], loaded


def test_every_app_module_imports_without_the_ml_stack():
    modules, loaded = _import_all("app", ["torch", "transformers", "hivemind", "bitsandbytes", "engine"])
    assert "app" in modules
    assert not loaded & {"torch", "transformers", "hivemind", "engine"}


def test_contract_imports_only_the_standard_library():
    """The app and the engine share `contract`: it may load nothing but the standard library."""
    modules, loaded = _import_all("contract", [])
    _, interpreter = _import_all("json", [])  # what any interpreter here loads (site hooks, __main__)
    assert "contract.records" in modules
    assert loaded - interpreter - set(sys.stdlib_module_names) == {"contract"}


def test_engine_never_imports_qt():
    modules, loaded = _import_all("engine", ["PySide6", "shiboken6"])
    assert len(modules) > 5, modules
    assert not loaded & {"PySide6", "shiboken6"}


def test_blocker_really_blocks():
    """The check above would be worthless if blocking did not work: prove it fails on a real import."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, "engine.models.tiny", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "json is blocked" in result.stderr
