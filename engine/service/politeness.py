"""The engine's politeness settings and monitor (engine/polite): load, save, apply, report.

A part of EngineService (engine/service/engine.py). The settings live in `policy.json` in the data folder
(the app sends its own through PUT /api/policy at each start, so the two agree); a broken file is set aside
and defaults apply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from engine.service.core import ServiceCore
from engine.service.errors import InvalidRequestError

logger = logging.getLogger(__name__)

POLICY_FILE = "policy.json"


class Politeness:
    """policy() / set_policy() and the monitor's lifecycle; the monitor pauses and resumes `service`."""

    def __init__(self, core: ServiceCore, service: Any):
        self.core = core
        self.service = service
        self.data_dir = core.data_dir
        self.monitor = None  # engine.polite.monitor.PoliteMonitor once started

    def start(self) -> None:
        from engine import envs
        from engine.polite.monitor import PoliteMonitor

        settings = self._load_policy()
        monitor = PoliteMonitor(
            self.service, settings, interval=envs.polite_interval(), cpu_watch=envs.polite_cpu_watch()
        )
        self.monitor = monitor
        monitor.start()

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()

    def _load_policy(self):
        from engine.polite.settings import PolicyError, PolicySettings

        path = self.data_dir / POLICY_FILE
        try:
            return PolicySettings.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return PolicySettings()
        except (OSError, ValueError, PolicyError) as exc:
            logger.warning("politeness settings %s unreadable (%s): using defaults", path, exc)
            with contextlib.suppress(OSError):
                path.replace(path.with_suffix(".bad"))
            return PolicySettings()

    def policy(self) -> dict[str, Any]:
        """/api/policy: the settings, each detector's latest reading (or why it is unsupported here), and
        the policy's current decision."""
        if self.monitor is None:
            from engine.polite.settings import PolicySettings

            return dict(settings=PolicySettings().to_dict(), detectors={}, decision=dict(pause=False))
        self.monitor.probe_all()
        return self.monitor.snapshot()

    def set_policy(self, data: dict[str, Any]) -> dict[str, Any]:
        """Replace the settings (missing keys take their defaults), save them, apply them at the next tick."""
        from engine.polite.settings import PolicyError, PolicySettings

        try:
            settings = PolicySettings.from_dict(data)
        except PolicyError as exc:
            raise InvalidRequestError(str(exc)) from None
        path = self.data_dir / POLICY_FILE
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(settings.to_dict(), indent=1))
        os.replace(temporary, path)
        if self.monitor is not None:
            self.monitor.set_settings(settings)
        return self.policy()
