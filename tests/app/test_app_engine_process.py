"""EngineProcess: start, health, crash then restart with backoff, failure reasons, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app.engine_process import (
    FAILED,
    RESTARTING,
    RUNNING,
    EngineProcess,
    LocalBackend,
    crash_reason,
    engine_args,
    engine_command,
    read_state_file,
)

FAKE = str(Path(__file__).with_name("fake_engine.py"))


def make_engine(data_dir, command, **kwargs) -> EngineProcess:
    return EngineProcess(Path(data_dir), lambda: list(command), backoff_s=(0.1,), **kwargs)


@pytest.fixture
def engines():
    made = []
    yield made
    for engine in made:
        engine.stop(timeout_s=3)


def test_engine_command_shape():
    command = engine_command("private", ("/ip4/1.2.3.4/tcp/1/p2p/Qm",), parent_pid=42, extra_args=("--x",))
    assert command[command.index("--initial-peers") + 1] == "/ip4/1.2.3.4/tcp/1/p2p/Qm"
    assert command[:5] == [sys.executable, "-m", "engine.cli", "run", "--port"]
    assert command[command.index("--swarm") + 1] == "private"
    assert command[command.index("--parent-pid") + 1] == "42"
    assert command[-1] == "--x"


def test_start_crash_restart_and_stop(qtbot, app_dirs, engines):
    engine = make_engine(app_dirs["data"], [sys.executable, FAKE])
    engines.append(engine)
    messages = []
    engine.state_changed.connect(lambda state, message: messages.append((state, message)))
    with qtbot.waitSignal(engine.endpoint_changed, timeout=15000, check_params_cb=lambda e: e is not None):
        engine.start()
    assert engine.state == RUNNING and engine.owned
    first_pid = engine.pid
    assert read_state_file(app_dirs["data"]).token == "fake-token"

    os.kill(first_pid, signal.SIGKILL)  # the engine crashes
    qtbot.waitUntil(lambda: engine.state == RESTARTING, timeout=5000)
    assert "stopped unexpectedly" in engine.message and "Restarting" in engine.message
    qtbot.waitUntil(lambda: engine.state == RUNNING, timeout=15000)
    assert engine.pid != first_pid
    assert ("running", "The engine restarted.") in messages

    second_pid = engine.pid
    engine.stop(timeout_s=5)
    assert not psutil.pid_exists(second_pid) or psutil.Process(second_pid).status() == psutil.STATUS_ZOMBIE


def test_engine_that_cannot_start_says_why(qtbot, app_dirs, engines):
    engine = make_engine(app_dirs["data"], [sys.executable, FAKE, "--fail-start"])
    engines.append(engine)
    engine.start()
    qtbot.waitUntil(lambda: engine.state == FAILED, timeout=20000)
    assert "cannot start" in engine.message
    assert "CUDA driver too old" in engine.message
    assert "engine.log" in engine.message


def test_no_engine_mode_attaches_and_never_kills(qtbot, app_dirs, fake_engine):
    engine = EngineProcess(app_dirs["data"], lambda: ["false"], manage=False)
    engine.start()
    assert engine.state == "starting" and "Waiting" in engine.message
    fake_engine.write_state_file(app_dirs["data"])
    qtbot.waitUntil(lambda: engine.state == RUNNING, timeout=5000)
    assert not engine.owned
    engine.stop()  # the engine's pid is this test process: it must survive
    assert engine.state == "stopped"


@pytest.mark.parametrize("recorded", ["reused pid", "no identity"])
def test_a_pid_taken_by_another_process_is_never_signalled(qtbot, app_dirs, engines, recorded):
    """After a crash the state file may name a pid that an unrelated process has taken since."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        state = {"pid": stranger.pid, "port": 1, "base_url": "http://127.0.0.1:1", "token_source": "none"}
        if recorded == "reused pid":  # what the crashed engine recorded: another start time and command
            started = psutil.Process(stranger.pid).create_time() - 3600
            state.update(process_started=started, cmdline=[sys.executable, "-m", "engine.cli", "run"])
        (app_dirs["data"] / "engine-state.json").write_text(json.dumps(state))
        assert read_state_file(app_dirs["data"]) is None

        engine = make_engine(app_dirs["data"], [sys.executable, FAKE], startup_timeout_s=20)
        engines.append(engine)
        ready = qtbot.waitSignal(engine.endpoint_changed, timeout=15000, check_params_cb=lambda e: bool(e))
        with ready:
            engine.start()  # starts its own engine instead of "connecting" to the stranger
        assert engine.owned and engine.pid != stranger.pid
        engine.stop(timeout_s=5)
        assert stranger.poll() is None, "the app signalled a process that is not its engine"
    finally:
        stranger.kill()
        stranger.wait()


def test_local_backend_ties_the_engine_to_the_app_only_when_asked(tmp_path):
    backend = LocalBackend(tmp_path)
    args = engine_args("local", extra_args=("--log-level=debug",))
    tied = backend.engine_command(args, tie_to_app=True)
    assert tied[:4] == [sys.executable, "-m", "engine.cli", "run"]
    assert tied[tied.index("--parent-pid") + 1] == str(os.getpid())
    assert "--log-level=debug" in tied
    assert "--parent-pid" not in backend.engine_command(args, tie_to_app=False)


def test_crash_reason_is_the_last_error_of_this_run(qtbot, app_dirs, engines):
    """An earlier run's error in the same log is no reason for this run's crash (issue 11)."""
    log = app_dirs["data"] / "logs" / "engine.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("RuntimeError: There is no current event loop in thread 'pollinate-close'.\n")
    engine = make_engine(app_dirs["data"], [sys.executable, FAKE])
    engines.append(engine)
    engine.start()
    qtbot.waitUntil(lambda: engine.state == RUNNING, timeout=15000)
    os.kill(engine.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: engine.state == RESTARTING, timeout=5000)
    assert "event loop" not in engine.message and "SIGKILL" in engine.message, engine.message


def test_crash_reason_skips_warnings():
    tail = "\n".join(
        [
            "2026-11-27 ERROR engine: CUDA out of memory while loading block 3",
            "/x/span.py:100: FutureWarning: `past_key_values` is deprecated",
            "  masks[kind] = build(**mask_args, past_key_values=adapter)",
            "2026-11-27 WARNING hivemind: peer error: timed out",
        ]
    )
    assert crash_reason(tail, 1) == "2026-11-27 ERROR engine: CUDA out of memory while loading block 3"
    assert crash_reason("/x.py:1: UserWarning: something\n", 1) == "no error in its output"
    assert "SIGTERM" in crash_reason("", -15)
