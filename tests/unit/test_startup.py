"""The engine's start-up defers modules hivemind imports but the engine never uses; they still work."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
from engine.startup import defer_unused_imports
defer_unused_imports()
import hivemind  # runs `import scipy.optimize` (averaging's load balancing)
print("loaded at start:", "scipy.optimize._optimize" in sys.modules)
import scipy.optimize
result = scipy.optimize.linprog([1.0], bounds=[(2.0, 5.0)])  # first use loads the real module
print("first use:", round(float(result.x[0]), 3), "scipy.optimize._optimize" in sys.modules)
"""


def test_scipy_optimize_loads_on_first_use_not_at_start():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded at start: False" in out.stdout, out.stdout
    assert "first use: 2.0 True" in out.stdout, out.stdout


def test_deferring_is_harmless_when_already_loaded():
    code = "import scipy.optimize as o; from engine.startup import defer_unused_imports; "
    code += "defer_unused_imports(); print(o.linprog)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "linprog" in out.stdout, out.stderr[-2000:]
