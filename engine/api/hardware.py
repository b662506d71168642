"""What this machine has: GPUs (torch, imported lazily), CPU, RAM and disk (psutil). No GPU is normal."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    gpus: list[dict[str, Any]] = []
    try:
        if torch.cuda.is_available():
            backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                name = torch.cuda.get_device_name(index)
                gpus.append(dict(index=index, name=name, backend=backend, total_bytes=total, free_bytes=free))
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            import psutil

            # Apple GPUs share system memory: report it as the GPU's.
            memory = psutil.virtual_memory()
            gpus.append(
                dict(
                    index=0,
                    name="Apple GPU",
                    backend="mps",
                    total_bytes=memory.total,
                    free_bytes=memory.available,
                )
            )
    except Exception as exc:  # a broken driver is reported as "no GPU", not as a failing endpoint
        logger.warning("could not query GPUs: %s", exc)
    return gpus


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def probe_hardware(disk_path: Path) -> dict[str, Any]:
    """GPUs, CPU, RAM and the disk holding `disk_path`, in the shape of /api/hardware."""
    import psutil

    memory = psutil.virtual_memory()
    path = Path(disk_path)
    while not path.exists() and path != path.parent:
        path = path.parent
    disk = shutil.disk_usage(path)
    return {
        "gpus": _gpus(),
        "cpu": {"name": _cpu_name(), "cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1},
        "ram": {"total_bytes": memory.total, "available_bytes": memory.available},
        "disk": {"path": str(disk_path), "total_bytes": disk.total, "free_bytes": disk.free},
    }


class HardwareProbe:
    """probe_hardware, reused for `max_age` seconds: the app asks often and a GPU query can take seconds
    (the first one initialises the driver). Callers arriving during a probe wait for it instead of probing."""

    def __init__(self, disk_path: Path, max_age: float = 5.0):
        self.disk_path = disk_path
        self.max_age = max_age
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None
        self.probes = 0

    def read(self) -> dict[str, Any]:
        with self._lock:
            if self._last is None or time.monotonic() - self._last[0] > self.max_age:
                self._last = (time.monotonic(), probe_hardware(self.disk_path))
                self.probes += 1
            return self._last[1]
