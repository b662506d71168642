"""The politeness monitor: reads the detectors, asks the policy, pauses or resumes the engine's sharing.

A thread of the engine service. Each tick (POLLINATE_POLITE_INTERVAL, 2 s by default) it reads the detectors
the settings use, runs `policy.decide`, and acts on the service: pause (source "policy") when a rule turns
active, escalate a held pause to a release, resume when every rule has cleared. It never overrides the
user's own pause, and ends that pause when its end time has passed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.polite.policy import RULES_BY_READING, Decision, PolicyMemory, decide
from engine.polite.readings import Detector, Reading
from engine.polite.settings import PolicySettings

logger = logging.getLogger(__name__)


def own_process_tree(pid: int | None = None) -> set[int]:
    """Our pid and our descendants' (DHT peers, p2p daemons): their load is not "other programs"."""
    import psutil

    pid = pid or os.getpid()
    try:
        return {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return {pid}


def default_detectors(settings: Callable[[], PolicySettings], cpu_watch: str | None = None) -> list[Detector]:
    """One detector of each kind for this machine (each says when it cannot work here)."""
    from engine.polite.battery import BatteryDetector
    from engine.polite.cpu import CpuDetector
    from engine.polite.exclusive import ExclusiveAppDetector
    from engine.polite.foreground import FullscreenDetector
    from engine.polite.gpu import GpuTemperatureDetector, GpuUseDetector, Nvml
    from engine.polite.idle import IdleDetector
    from engine.polite.schedule import ScheduleDetector

    watch = None
    if cpu_watch:

        def watch(process) -> bool:
            return any(cpu_watch in part for part in process.cmdline())

    nvml = Nvml()
    return [
        ExclusiveAppDetector(lambda: settings().exclusive_apps),
        FullscreenDetector(),
        GpuUseDetector(nvml, own_process_tree),
        GpuTemperatureDetector(nvml),
        CpuDetector(watch=watch),
        BatteryDetector(),
        IdleDetector(),
        ScheduleDetector(lambda: settings().schedule),
    ]


class PoliteMonitor:
    """Drives `service` (an EngineService: status, pause_sharing, resume_sharing, hosting_device).

    Cheap to construct; `start()` runs the loop in a daemon thread, `stop()` ends it. `tick(now)` is one
    step of the loop (tests call it directly with their own clock).
    """

    def __init__(
        self,
        service,
        settings: PolicySettings,
        detectors: list[Detector] | None = None,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_watch: str | None = None,
    ):
        self.service = service
        self.interval = interval
        self.clock = clock
        self._settings = settings
        if detectors is None:
            detectors = default_detectors(lambda: self._settings, cpu_watch)
        self._detectors = detectors
        self._memory = PolicyMemory()
        self._decision = Decision(False)
        self._readings: dict[str, Reading] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def settings(self) -> PolicySettings:
        return self._settings

    def set_settings(self, settings: PolicySettings) -> None:
        """New settings take effect at the next tick (rules turned off clear at once)."""
        with self._lock:
            self._settings = settings

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pollinate-polite", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick(self.clock())
            except Exception:
                logger.warning("politeness monitor tick failed", exc_info=True)

    def tick(self, now: float) -> Decision:
        """Read, decide, act once."""
        settings = self._settings
        if self.service.throttle != (settings.max_sessions, settings.compute_share):
            self.service.set_throttle(settings.max_sessions, settings.compute_share)
        on_cpu = self.service.hosting_device() == "cpu"
        readings = {}
        for detector in self._detectors:
            rule = RULES_BY_READING.get(detector.name)
            if rule is None or rule.enabled(settings, on_cpu):
                readings[detector.name] = detector.read()
        memory, decision = decide(self._memory, readings, settings, now, hosting_on_cpu=on_cpu)
        with self._lock:
            self._memory, self._decision = memory, decision
            self._readings.update(readings)
        self._act(decision, settings)
        return decision

    def _act(self, decision: Decision, settings: PolicySettings) -> None:
        from engine.service.errors import ServiceError

        status = self.service.status()
        state, pause = status["state"], status.get("pause")
        try:
            if state == "paused" and pause and pause["source"] == "user":
                if pause["until"] is not None and pause["until"] <= time.time():
                    logger.info("the user's pause has ended: resuming")
                    self.service.resume_sharing("user")
                return
            if decision.pause and state == "serving":
                logger.info("pausing sharing: %s", decision.message)
                self._pause(decision, settings)
            elif decision.pause and state == "paused" and pause and pause["source"] == "policy":
                escalate = decision.release and pause["mode"] == "hold"
                if escalate or pause["reason"] != decision.reason:
                    self._pause(decision, settings)
            elif not decision.pause and state == "paused" and pause and pause["source"] == "policy":
                logger.info("resuming sharing: every politeness rule has cleared")
                self.service.resume_sharing("policy")
        except ServiceError as exc:  # the state moved meanwhile (a user action): next tick sees it
            logger.debug("politeness monitor could not act: %s", exc)

    def _pause(self, decision: Decision, settings: PolicySettings) -> None:
        self.service.pause_sharing(
            decision.reason,
            decision.message,
            until=decision.until,
            release=decision.release,
            grace_seconds=settings.grace_seconds,
            source="policy",
        )

    def snapshot(self) -> dict[str, Any]:
        """Settings, every detector's latest reading (or why it cannot work here), and the decision."""
        with self._lock:
            readings, decision, settings = dict(self._readings), self._decision, self._settings
        return dict(
            settings=settings.to_dict(),
            detectors={d.name: _reading_dict(readings.get(d.name)) for d in self._detectors},
            decision=dict(
                pause=decision.pause,
                reason=decision.reason,
                message=decision.message,
                until=decision.until,
                release=decision.release,
                active=list(decision.active),
            ),
        )

    def probe_all(self) -> None:
        """Read every detector once (Settings shows which work here, even for rules that are off)."""
        readings = {d.name: d.read() for d in self._detectors}
        with self._lock:
            self._readings.update(readings)


def _reading_dict(reading: Reading | None) -> dict[str, Any]:
    if reading is None:
        return dict(value=None, detail="not read yet", unsupported=None, until=None)
    return dict(
        value=reading.value, detail=reading.detail, unsupported=reading.unsupported, until=reading.until
    )
