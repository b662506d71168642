"""Desktop app start-up: time from launch to the shown dashboard, and the GUI process's memory (RSS).

Runs `python -m app --no-engine --report-startup` (no engine: it measures the GUI alone; the target is under
a second) several times in fresh data/config folders and prints a table.

    python bench/app_startup.py [--runs 5]
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


def one_run(env: dict[str, str]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "app",
            "--no-engine",
            "--report-startup",
            "--data-dir",
            f"{tmp}/data",
            "--config-dir",
            f"{tmp}/config",
        ]
        started = time.time()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"app failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    report = json.loads(lines[-1])
    if not report["shown"]:
        raise RuntimeError("the dashboard was not shown")
    return report["shown_at"] - started, int(report["rss_bytes"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ)
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
    one_run(env)  # warm the OS file cache; not counted
    times, rss = zip(*(one_run(env) for _ in range(args.runs)), strict=True)
    platform = env.get("QT_QPA_PLATFORM", "native")
    print(f"platform: {platform}, python {sys.version.split()[0]}, runs: {args.runs}")
    print(f"{'metric':<34}{'min':>10}{'median':>10}{'max':>10}")
    median = statistics.median(times)
    print(f"{'launch -> dashboard shown (s)':<34}{min(times):>10.3f}{median:>10.3f}{max(times):>10.3f}")
    mib = [r / 2**20 for r in rss]
    print(f"{'GUI process RSS (MiB)':<34}{min(mib):>10.1f}{statistics.median(mib):>10.1f}{max(mib):>10.1f}")
    target = "met" if statistics.median(times) < 1.0 else "MISSED"
    print(f"target < 1 s without the engine: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
