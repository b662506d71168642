"""This computer's memory as the app can see it before any engine runs (first-run onboarding).

The same shape as the engine's /api/hardware (gpus, ram), from `nvidia-smi` and psutil: the app must not
import torch. Only what a memory-share slider needs.
"""

from __future__ import annotations

import shutil
import subprocess

import psutil

MiB = 1024**2


def nvidia_gpus(timeout: float = 3.0) -> list[dict]:
    """NVIDIA GPUs with their free and total memory, from nvidia-smi; [] when there is none (or it fails)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = ["--query-gpu=index,name,memory.free,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(
            [smi, *query], capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
        gpus = []
        for line in out.splitlines():
            if line.strip():
                index, name, free, total = (part.strip() for part in line.split(","))
                gpus.append(
                    {
                        "index": int(index),
                        "name": name,
                        "backend": "cuda",
                        "free_bytes": int(float(free) * MiB),
                        "total_bytes": int(float(total) * MiB),
                    }
                )
        return gpus
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def probe_hardware() -> dict:
    """{"gpus": [...], "ram": {...}} for this computer, like the engine's /api/hardware answers."""
    memory = psutil.virtual_memory()
    return {
        "gpus": nvidia_gpus(),
        "ram": {"total_bytes": int(memory.total), "available_bytes": int(memory.available)},
    }
