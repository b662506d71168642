"""Freeze the desktop app with PyInstaller (installers/pyinstaller/pollinate.spec), then smoke-run the bundle.

The smoke run starts the frozen binary offscreen in fresh data/config folders; it must show the dashboard,
start an engine (this checkout's engine, run by this Python: POLLINATE_ENGINE_PYTHON) and see it running,
then quit and leave no engine behind. Prints a table: bundle size, launch -> dashboard, launch -> engine
running, GUI memory. Needs `pip install pyinstaller` (the `bundle` extra).

    python installers/build_bundle.py [--skip-build] [--runs 3] [--dist build/dist]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "installers" / "pyinstaller" / "pollinate.spec"
ENGINE_ONLY = ("torch", "transformers", "hivemind", "engine", "numpy")


def build(dist: Path, work: Path) -> float:
    """Run PyInstaller; returns the seconds it took."""
    started = time.monotonic()
    command = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN"]
    command += ["--distpath", str(dist), "--workpath", str(work), str(SPEC)]
    subprocess.run(command, cwd=ROOT, check=True)
    return time.monotonic() - started


def binary(dist: Path) -> Path:
    name = "pollinate.exe" if sys.platform == "win32" else "pollinate"
    return dist / "pollinate" / name


def bundle_size(folder: Path) -> tuple[int, int]:
    files = [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]
    return sum(path.stat().st_size for path in files), len(files)


def engine_parts_inside(folder: Path) -> list[str]:
    """Top-level names in the bundle that belong to the engine (must be none)."""
    internal = folder / "_internal"
    names = {path.name.split(".")[0] for path in internal.iterdir()} if internal.is_dir() else set()
    return sorted(names & set(ENGINE_ONLY))


def smoke_run(executable: Path, timeout_s: float = 240.0, env: dict[str, str] | None = None) -> dict:
    """Launch the frozen app until its engine runs, then quit; the report, times relative to launch."""
    environment = dict(env or os.environ)
    environment.setdefault("QT_QPA_PLATFORM", "offscreen")
    environment.setdefault("POLLINATE_ENGINE_PYTHON", sys.executable)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environment.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        # The light demo model: the smoke run checks the bundle, not the swarm (it quits once the API runs).
        command = [str(executable), "--report-engine", str(timeout_s - 20), "--engine-arg=--demo-model=tiny"]
        command += ["--data-dir", f"{tmp}/data", "--config-dir", f"{tmp}/config"]
        started = time.time()
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout_s)
        leftover = (Path(tmp) / "data" / "engine-state.json").exists()
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the bundle failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads(lines[-1])
    report["shown_s"] = report["shown_at"] - started
    report["engine_s"] = report["engine_at"] - started
    report["engine_left_running"] = leftover
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-build", action="store_true", help="smoke-run an existing bundle")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dist", type=Path, default=ROOT / "build" / "dist")
    args = parser.parse_args()
    build_s = None if args.skip_build else build(args.dist, args.dist.parent / "work")
    folder = args.dist / "pollinate"
    inside = engine_parts_inside(folder)
    if inside:
        print(f"error: the GUI bundle contains engine parts: {inside}", file=sys.stderr)
        return 1
    size, files = bundle_size(folder)
    reports = [smoke_run(binary(args.dist)) for _ in range(args.runs)]
    for report in reports:
        if not report["shown"] or report["engine_state"] != "running" or report["engine_left_running"]:
            print(f"error: smoke run failed: {report}", file=sys.stderr)
            return 1
    print(f"bundle: {folder} ({files} files), python {sys.version.split()[0]}, {sys.platform}")
    if build_s is not None:
        print(f"build time: {build_s:.0f} s")
    print(f"{'metric':<36}{'min':>10}{'median':>10}{'max':>10}")
    rows = {
        "bundle size (MiB)": [size / 2**20],
        "launch -> dashboard shown (s)": [r["shown_s"] for r in reports],
        "launch -> engine running (s)": [r["engine_s"] for r in reports],
        "GUI process RSS (MiB)": [r["rss_bytes"] / 2**20 for r in reports],
    }
    for name, values in rows.items():
        print(f"{name:<36}{min(values):>10.2f}{statistics.median(values):>10.2f}{max(values):>10.2f}")
    print("smoke: dashboard shown, engine running, engine stopped on quit: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
