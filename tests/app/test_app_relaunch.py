"""Ten relaunches of the app with the real engine: each one answers at once, and quits promptly (issue 11).

Slow: ten engine starts on a local swarm.
"""

from __future__ import annotations

import importlib.util
import time

import psutil
import pytest

from app.controller import AppController
from app.engine_process import log_tail
from app.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),  # ten engine starts: 3-5 minutes here, more on a busy machine
    pytest.mark.skipif(
        importlib.util.find_spec("engine.service_cli") is None, reason="the engine's `run` command is missing"
    ),
]

LAUNCHES = 10
START_TIMEOUT_MS = 180_000
ANSWER_TIMEOUT_MS = 10_000  # a wedged engine answered status but let these hang for 20-30 s


def _answered(qtbot, ctl, path: str) -> float:
    call = ctl.client.get(path)
    started = time.monotonic()
    failures = []
    call.failed.connect(failures.append)
    with qtbot.waitSignals([call.succeeded], timeout=ANSWER_TIMEOUT_MS, raising=False) as blocker:
        pass
    assert not failures, f"{path}: {failures[0]}"
    if not blocker.signal_triggered:
        import httpx

        endpoint = ctl.client.endpoint
        began = time.monotonic()
        try:
            direct = httpx.get(
                endpoint.base_url + path, headers={"Authorization": f"Bearer {endpoint.token}"}, timeout=30
            ).status_code
        except Exception as exc:
            direct = repr(exc)
        pytest.fail(
            f"{path} did not answer the app in {ANSWER_TIMEOUT_MS} ms; "
            f"directly: {direct} after {time.monotonic() - began:.1f} s"
        )
    return time.monotonic() - started


def test_ten_relaunches_answer_and_quit_promptly(qtbot, app_dirs):
    rows = []
    for launch in range(LAUNCHES):
        # Every other launch shares (and quits while sharing), as a user who turned sharing on would.
        ctl = AppController(
            Settings(onboarded=True, swarm="local"),
            use_system_tray=False,
            engine_args=("--demo-model", "tiny"),  # relaunching is the point, not the demo model
        )
        ctl.confirm_quit = False
        ctl.quit_app = lambda: None
        began = time.monotonic()
        seen = []
        ctl.feed.status.connect(
            lambda st, seen=seen, began=began: seen.append(
                (round(time.monotonic() - began, 2), st["ready"], st["message"])
            )
        )
        ctl.start()
        pid = None
        try:
            qtbot.waitUntil(
                lambda ctl=ctl: (
                    ctl.engine.state == "running"
                    and (ctl.dashboard_model.snapshot.status or {}).get("ready") is True
                ),
                timeout=START_TIMEOUT_MS,
            )
            pid = ctl.engine.pid
            ready = time.monotonic() - began
            waits = {
                path: _answered(qtbot, ctl, path)
                for path in ("/v1/models", "/api/swarm", "/api/hosting/plan")
            }
            if launch % 2:
                ctl.dashboard_model.set_sharing(True)
                qtbot.waitUntil(lambda ctl=ctl: ctl.tray.state == "serving", timeout=START_TIMEOUT_MS)
        except Exception:
            pytest.fail(f"launch {launch} wedged; status events {seen}\n{log_tail(ctl.engine.log_path, 40)}")
        finally:
            stopping = time.monotonic()
            ctl.shutdown()
            quit_s = time.monotonic() - stopping
            for window in (ctl.dashboard, ctl._chat_window):
                if window is not None:
                    window.deleteLater()
            ctl.deleteLater()
            qtbot.wait(10)
        assert (
            pid is None or not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        )
        rows.append((launch, round(ready, 1), {k: round(v, 2) for k, v in waits.items()}, round(quit_s, 1)))
        print(rows[-1])
        # Within the app's graceful-stop limit (15 s, then it kills the engine): the engine stopped itself.
        assert quit_s < 15, f"launch {launch}: quitting took {quit_s:.1f} s"
