"""`pollinate-engine run` process behaviour: --parent-pid, fast SIGTERM shutdown, API sockets and forks."""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.cli import build_parser
from engine.service_cli import _parent_gone
from tests.helpers.servers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_run_accepts_parent_pid():
    args = build_parser().parse_args(["run", "--parent-pid", "42", "--port", "0"])
    assert args.parent_pid == 42


def test_run_takes_draft_blocks_and_the_config_refuses_a_negative_count(tmp_path):
    from engine.service.config import ServiceConfig

    assert build_parser().parse_args(["run"]).draft_blocks == 0  # prompt lookup by default
    assert build_parser().parse_args(["run", "--draft-blocks", "4"]).draft_blocks == 4
    assert ServiceConfig(data_dir=tmp_path, draft_blocks=4).draft_blocks == 4
    with pytest.raises(ValueError, match="draft_blocks must be >= 0"):
        ServiceConfig(data_dir=tmp_path, draft_blocks=-1)


def test_run_takes_a_feature_drafter_and_the_config_refuses_a_missing_path(tmp_path):
    from engine.service.config import ServiceConfig

    assert build_parser().parse_args(["run"]).feature_drafter == "auto"  # the shipped one, if any
    assert build_parser().parse_args(["run", "--feature-drafter", "off"]).feature_drafter == "off"
    weights = tmp_path / "drafter.safetensors"
    weights.write_bytes(b"")
    assert ServiceConfig(data_dir=tmp_path, feature_drafter=str(weights)).feature_drafter == str(weights)
    with pytest.raises(ValueError, match="auto, off or the path of a drafter's weights; nothing is at"):
        ServiceConfig(data_dir=tmp_path, feature_drafter=str(tmp_path / "missing"))


def test_parent_gone():
    assert not _parent_gone(None)
    assert not _parent_gone(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert _parent_gone(child.pid)


def _sleep_forever() -> None:
    time.sleep(60)


def test_forked_children_do_not_hold_api_connections():
    """A keep-alive connection the server closes must reach the client even after a fork (hivemind DHTs)."""
    from fastapi import FastAPI

    from engine.api.server import ApiServer

    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    with ApiServer(app, 0) as server:
        server._server.config.timeout_keep_alive = 1
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/ping")
        assert json.loads(connection.getresponse().read()) == {"ok": True}
        child = mp.get_context("fork").Process(target=_sleep_forever, daemon=True)
        child.start()
        try:
            time.sleep(2.5)  # the server closes the idle connection; the child must not keep it open
            connection.sock.settimeout(5)
            assert connection.sock.recv(1) == b""  # EOF, not a timeout
        finally:
            child.kill()
            child.join()
            connection.close()


def _wait_for_state(data_dir: Path, process: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            return json.loads((data_dir / "engine-state.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise TimeoutError("the engine wrote no state file")


@pytest.mark.slow
def test_engine_exits_when_its_parent_dies(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    command = [sys.executable, "-m", "engine.cli", "run", "--port", "0", "--data-dir", str(tmp_path)]
    engine = subprocess.Popen(
        [*command, "--parent-pid", str(parent.pid)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_state(tmp_path, engine)
        parent.kill()
        parent.wait()
        assert engine.wait(timeout=30) == 0
        assert not (tmp_path / "engine-state.json").exists()
    finally:
        for process in (parent, engine):
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_sigterm_stops_an_idle_engine_quickly(tmp_path):
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    command = [sys.executable, "-m", "engine.cli", "run", "--port", "0", "--data-dir", str(tmp_path)]
    command += ["--demo-model", "tiny"]
    engine = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        state = _wait_for_state(tmp_path, engine)
        token = (tmp_path / "engine-api-token").read_text().strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until ready: the demo server and the DHT peers run
            connection = http.client.HTTPConnection("127.0.0.1", state["port"], timeout=10)
            connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"})
            if json.loads(connection.getresponse().read())["ready"]:
                break
            time.sleep(0.5)
        began = time.monotonic()
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=30) == 0
        assert time.monotonic() - began < 5.0
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_live_state_needs_the_same_process_not_just_its_pid(tmp_path):
    from engine.service_cli import process_identity, read_live_state, write_state

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = process_identity(stranger.pid)
        write_state(tmp_path, {**identity, "port": 1})
        assert read_live_state(tmp_path)["pid"] == stranger.pid
        write_state(tmp_path, {**identity, "process_started": identity["process_started"] - 3600})
        assert read_live_state(tmp_path) is None  # the pid was taken by another process since
        write_state(tmp_path, {**identity, "cmdline": ["pollinate-engine", "run"]})
        assert read_live_state(tmp_path) is None
        write_state(tmp_path, {"pid": stranger.pid, "port": 1})  # no identity recorded: not proof
        assert read_live_state(tmp_path) is None
    finally:
        stranger.kill()
        stranger.wait()


def test_run_accepts_exit_on_stdin_eof():
    """The app on Windows ties the engine in WSL to itself through wsl.exe's stdin (no shared pids)."""
    assert build_parser().parse_args(["run", "--exit-on-stdin-eof"]).exit_on_stdin_eof
    assert not build_parser().parse_args(["run"]).exit_on_stdin_eof


def _ready_engine(tmp_path: Path, **popen) -> tuple[subprocess.Popen, dict]:
    """A `pollinate-engine run` child that is ready (demo server and DHT peers running)."""
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    command = [sys.executable, "-m", "engine.cli", "run", "--port", "0", "--data-dir", str(tmp_path)]
    command += ["--demo-model", "tiny"]
    engine = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )
    state = _wait_for_state(tmp_path, engine)
    token = (tmp_path / "engine-api-token").read_text().strip()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", state["port"], timeout=10)
        connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"})
        if json.loads(connection.getresponse().read())["ready"]:
            return engine, state
        time.sleep(0.5)
    raise TimeoutError("the engine did not become ready")


def _left_running(known: dict[int, float]) -> list[str]:
    left = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {process.name()}")
        except psutil.Error:
            pass
    return left


def _kill_all(known: dict[int, float]) -> None:
    for pid, started in known.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.kill()


@pytest.mark.slow
def test_kill_9_of_the_engine_leaves_no_process(tmp_path):
    """Issue 12 #3: DHT processes, p2p daemons and every other child go when the engine is killed.

    It starts from damaged stores (issue 12 #8): each is set aside, recorded for the app, and started anew.
    """
    from contract.stores import pending
    from engine.demo import demo_model_path

    (tmp_path / "engine-state.json").mkdir()  # a folder where the state file goes
    (tmp_path / "ledger.json").write_text("[" * 100_000 + "]" * 100_000)  # nested too deeply
    demo = demo_model_path(tmp_path)
    demo.mkdir(parents=True)
    (demo / "pollinate_tiny.json").write_text("{half a fi")
    engine, _state = _ready_engine(tmp_path)
    assert {notice.store for notice in pending(tmp_path)} == {
        "engine state file",
        "contribution ledger (points)",
        "demo model",
    }
    children = {p.pid: p.create_time() for p in psutil.Process(engine.pid).children(recursive=True)}
    try:
        names = sorted(psutil.Process(pid).name() for pid in children)
        assert any("p2pd" in name for name in names), names
        time.sleep(1.0)  # the reaper looks four times a second
        engine.kill()
        engine.wait()
        deadline = time.monotonic() + 5.0
        while _left_running(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _left_running(children), f"still running 5 s after kill -9: {_left_running(children)}"
    finally:
        _kill_all(children)


@pytest.mark.slow
def test_group_sigterm_stops_everything_within_10_s(tmp_path):
    """Issue 12 #5: what `timeout`, systemd and `docker stop` send: SIGTERM to the whole process group."""
    engine, _state = _ready_engine(tmp_path, start_new_session=True)
    children = {p.pid: p.create_time() for p in psutil.Process(engine.pid).children(recursive=True)}
    try:
        began = time.monotonic()
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(timeout=15)
        deadline = began + 10.0
        while _left_running(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert time.monotonic() - began < 10.0 and not _left_running(children), _left_running(children)
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()
        _kill_all(children)


_FAMILY = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from engine.lifetime import guard_children, install_fork_hooks
signal.signal(signal.SIGTERM, lambda *_: None)  # like the engine: a handler that only sets a flag
guard_children()
pid = os.fork()
if pid == 0:
    if os.fork() == 0:
        time.sleep(120)  # a grandchild, like the p2p daemon of a DHT process
    time.sleep(120)
print(pid, flush=True)
time.sleep(120)
"""


def test_reaper_ends_what_a_killed_process_left_and_spares_reused_pids():
    from engine.reaper import still_ours

    parent = subprocess.Popen(
        [sys.executable, "-c", _FAMILY, str(ROOT)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    family: dict[int, float] = {}
    try:
        int(parent.stdout.readline())
        time.sleep(1.0)  # the reaper notes descendants four times a second
        family = {p.pid: p.create_time() for p in psutil.Process(parent.pid).children(recursive=True)}
        assert len(family) == 3, family  # reaper, child, grandchild
        forked = [pid for pid in family if "engine.reaper" not in " ".join(psutil.Process(pid).cmdline())]
        os.kill(forked[0], signal.SIGTERM)  # a forked child no longer runs the parent's handler
        assert wait_for(lambda: not still_ours({forked[0]: family[forked[0]]}), timeout=5)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5.0
        while _left_running(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _left_running(family), _left_running(family)
        me = psutil.Process()
        assert still_ours({me.pid: me.create_time()}) == [me]
        assert still_ours({me.pid: me.create_time() - 100}) == []  # same pid, another process: never touched
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _kill_all(family)


@pytest.mark.slow
def test_engine_exits_when_its_stdin_closes(tmp_path):
    """What ties the engine in WSL to the app on Windows: the app's end of wsl.exe's stdin closes.

    It must work after the engine forked its helpers (a thread blocked in sys.stdin would deadlock them).
    """
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    command = [sys.executable, "-m", "engine.cli", "run", "--port", "0", "--data-dir", str(tmp_path)]
    command += ["--demo-model", "tiny", "--exit-on-stdin-eof"]
    engine = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        state = _wait_for_state(tmp_path, engine)
        token = (tmp_path / "engine-api-token").read_text().strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # ready: the demo server and the DHT peers were forked
            connection = http.client.HTTPConnection("127.0.0.1", state["port"], timeout=10)
            connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"})
            if json.loads(connection.getresponse().read())["ready"]:
                break
            time.sleep(0.5)
        engine.stdin.close()
        assert engine.wait(timeout=30) == 0
        assert b"standard input closed" in engine.stdout.read()
        assert not (tmp_path / "engine-state.json").exists()
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
