"""Other processes' GPU use and the GPU's temperature, through NVML (nvidia-ml-py, NVIDIA's binding).

A game shows up as a process using the GPU's streaming multiprocessors; our own processes (the engine tree)
are left out. A machine without an NVIDIA driver, or a user without permission to read per-process figures,
gets a Reading that says so (Settings shows it) instead of a silent zero.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

from engine.polite.readings import Reading, unsupported

GPU_NAME = "gpu"
TEMPERATURE_NAME = "gpu_temperature"
SAMPLE_WINDOW_US = 5_000_000  # per-process samples newer than this (NVML keeps a short history)


def other_gpu_percent(samples: Iterable, own_pids: set[int], since_us: int) -> tuple[float, set[int]]:
    """(percent of one GPU's SMs used by other processes, their pids) from NVML process samples.

    `samples` are records with pid, timeStamp (microseconds) and smUtil (percent), as
    nvmlDeviceGetProcessUtilization returns them; samples older than `since_us` are ignored. A process can
    have several samples: its latest counts.
    """
    latest: dict[int, tuple[int, float]] = {}
    for sample in samples:
        if sample.pid in own_pids or sample.timeStamp < since_us:
            continue
        if sample.pid not in latest or sample.timeStamp > latest[sample.pid][0]:
            latest[sample.pid] = (sample.timeStamp, float(sample.smUtil))
    busy = {pid for pid, (_, util) in latest.items() if util > 0}
    return min(100.0, sum(util for _, util in latest.values())), busy


def explain_nvml_error(nvml, error: Exception) -> str:
    """A sentence for Settings from an NVMLError (no driver, no permission, not supported)."""
    value = getattr(error, "value", None)
    if value in (nvml.NVML_ERROR_LIBRARY_NOT_FOUND, nvml.NVML_ERROR_DRIVER_NOT_LOADED):
        return "no NVIDIA driver on this machine"
    if value == nvml.NVML_ERROR_NO_PERMISSION:
        return "the NVIDIA driver does not let this user read other processes' GPU use"
    if value == nvml.NVML_ERROR_NOT_SUPPORTED:
        return "this GPU does not report per-process use"
    return f"NVML error: {error}"


class Nvml:
    """One NVML session shared by the GPU detectors (initialised on first use, thread-safe)."""

    def __init__(self, module=None):
        self._module = module
        self._lock = threading.Lock()
        self._handles: list | None = None
        self._error: str | None = None

    def handles(self) -> tuple[object, list]:
        """(the nvml module, device handles); raises RuntimeError with a person's sentence when unusable."""
        with self._lock:
            if self._handles is None and self._error is None:
                self._open()
            if self._error is not None:
                raise RuntimeError(self._error)
            return self._module, self._handles

    def _open(self) -> None:
        if self._module is None:
            try:
                import pynvml
            except ImportError:
                self._error = "nvidia-ml-py is not installed"
                return
            self._module = pynvml
        nvml = self._module
        try:
            nvml.nvmlInit()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except nvml.NVMLError as error:
            self._error = explain_nvml_error(nvml, error)
            return
        if not self._handles:
            self._error = "no NVIDIA GPU on this machine"


class GpuUseDetector:
    """Percent of the busiest GPU used by other processes (NVML per-process utilisation)."""

    name = GPU_NAME

    def __init__(self, nvml: Nvml, own_pids: Callable[[], set[int]] | None = None):
        self.nvml = nvml
        self.own_pids = own_pids or (lambda: {os.getpid()})

    def read(self) -> Reading:
        try:
            nvml, handles = self.nvml.handles()
        except RuntimeError as exc:
            return unsupported(GPU_NAME, str(exc))
        own = self.own_pids()
        worst, who = 0.0, set()
        for handle in handles:
            try:
                timestamp = int(time.time() * 1e6)  # NVML stamps samples in CPU microseconds
                samples = nvml.nvmlDeviceGetProcessUtilization(handle, max(0, timestamp - SAMPLE_WINDOW_US))
            except nvml.NVMLError as error:
                if getattr(error, "value", None) == nvml.NVML_ERROR_NOT_FOUND:
                    continue  # no process used this GPU lately
                return unsupported(GPU_NAME, explain_nvml_error(nvml, error))
            percent, pids = other_gpu_percent(samples, own, max(0, timestamp - SAMPLE_WINDOW_US))
            if percent >= worst:
                worst, who = percent, who | pids
        return Reading(GPU_NAME, worst, detail=", ".join(f"pid {p}" for p in sorted(who)))


class GpuTemperatureDetector:
    """The hottest GPU's core temperature in degrees Celsius."""

    name = TEMPERATURE_NAME

    def __init__(self, nvml: Nvml):
        self.nvml = nvml

    def read(self) -> Reading:
        try:
            nvml, handles = self.nvml.handles()
        except RuntimeError as exc:
            return unsupported(TEMPERATURE_NAME, str(exc))
        try:
            hottest = max(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU) for h in handles)
        except nvml.NVMLError as error:
            return unsupported(TEMPERATURE_NAME, explain_nvml_error(nvml, error))
        return Reading(TEMPERATURE_NAME, float(hottest), detail=f"{hottest} °C")
