"""The WSL2 engine backend: pure parts, then wsl.exe faked by tests/helpers/fake_wsl.py (no Windows needed).

The fake runs `--exec` commands as local children with the distribution's own environment, so the backend's
command lines, WSLENV, output decoding, state/token reading and stopping are exercised for real.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from app import wsl
from app.engine_process import FAILED, RUNNING, EngineProcess
from app.qt import QTimer
from app.wsl_backend import WslBackend, WslConfig
from tests.helpers import fake_wsl

ROOT = Path(__file__).resolve().parents[2]
FAKE_ENGINE = str(Path(__file__).with_name("fake_engine.py"))
GPU_LINE = "NVIDIA GeForce RTX 4090, 24564, 560.94"


# ---- pure parts


@pytest.mark.parametrize(
    "raw",
    [
        "WSL version: 2.3.26.0\r\n".encode("utf-16-le"),
        b"\xff\xfe" + "WSL version: 2.3.26.0\r\n".encode("utf-16-le"),
        b"WSL version: 2.3.26.0\n",
    ],
)
def test_wsl_output_is_decoded_in_either_encoding(raw):
    assert wsl.parse_version(wsl.decode_output(raw)) == (2, 3, 26, 0)


def test_version_parsing_any_language_and_minimum():
    assert wsl.parse_version("WSL-Version: 2.0.9.0\nKernelversion: 5.15.133.1-1") == (2, 0, 9, 0)
    assert wsl.parse_version("Version de WSL : 1.2.5.0") == (1, 2, 5, 0)
    assert wsl.parse_version("Invalid command line argument: --version") is None
    assert wsl.version_problem((2, 3, 26, 0)) == ""
    problem = wsl.version_problem((1, 2, 5, 0))
    assert "wsl --update" in problem and "1.2.5.0" in problem
    assert "the old built-in WSL" in wsl.version_problem(None)


def test_distribution_list_parsing():
    text = (
        "  NAME            STATE           VERSION\n"
        "* Ubuntu-22.04    Running         2\n"
        "  Pollinate       Stopped         2\n"
        "  Legacy          Stopped         1\n"
    )
    found = wsl.parse_distributions(text)
    assert [(d.name, d.state, d.version, d.default) for d in found] == [
        ("Ubuntu-22.04", "Running", 2, True),
        ("Pollinate", "Stopped", 2, False),
        ("Legacy", "Stopped", 1, False),
    ]
    assert wsl.parse_distributions("Windows Subsystem for Linux has no installed distributions.") == []


def test_nvidia_smi_parsing():
    gpus = wsl.parse_nvidia_smi(GPU_LINE + "\nNVIDIA GeForce RTX 3060, 12288, 560.94\n")
    assert gpus[0] == wsl.Gpu("NVIDIA GeForce RTX 4090", 24564, "560.94") and len(gpus) == 2
    assert wsl.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == []


@pytest.mark.parametrize(
    "windows, linux",
    [
        ("C:\\Users\\Ann\\HF cache", "/mnt/c/Users/Ann/HF cache"),
        ("D:\\", "/mnt/d"),
        ("e:/models/", "/mnt/e/models"),
        ("\\\\wsl$\\Pollinate\\home\\pollinate\\x", "/home/pollinate/x"),
        ("\\\\wsl.localhost\\Pollinate", "/"),
    ],
)
def test_windows_to_wsl_path(windows, linux):
    assert wsl.windows_to_wsl_path(windows) == linux


def test_path_translation_back_and_errors():
    assert wsl.wsl_to_windows_path("/mnt/c/Users/Ann") == "C:\\Users\\Ann"
    assert (
        wsl.wsl_to_windows_path("/home/pollinate/.local")
        == "\\\\wsl.localhost\\Pollinate\\home\\pollinate\\.local"
    )
    with pytest.raises(ValueError, match="not an absolute Windows path"):
        wsl.windows_to_wsl_path("models\\x")
    with pytest.raises(ValueError, match="not an absolute Linux path"):
        wsl.wsl_to_windows_path("relative/x")


def test_command_lines():
    assert wsl.exec_command("wsl.exe", "Pollinate", ["nvidia-smi"]) == [
        "wsl.exe", "-d", "Pollinate", "--exec", "nvidia-smi"
    ]  # fmt: skip
    assert wsl.exec_command("wsl.exe", "P", ["id"], user="root")[3:6] == ["-u", "root", "--exec"]
    assert wsl.wslenv(["HF_TOKEN", "FOO"], "FOO/p:BAR") == "FOO/p:BAR:HF_TOKEN"
    backend = WslBackend()
    tied = backend.engine_command(["run", "--port", "0", "--swarm", "public"], tie_to_app=True)
    assert tied[:5] == ["wsl.exe", "-d", "Pollinate", "--exec", "/opt/pollinate/venv/bin/python"]
    assert tied[5:9] == ["-m", "engine.cli", "run", "--port"]
    assert tied[tied.index("--data-dir") + 1] == "/home/pollinate/.local/share/pollinate"
    assert tied[-1] == "--exit-on-stdin-eof" and "--parent-pid" not in tied
    assert "--exit-on-stdin-eof" not in backend.engine_command(["run"], tie_to_app=False)


# ---- the backend against a fake wsl.exe


@pytest.fixture
def wsl_bin(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def gpu_tools(tmp_path) -> str:
    """A directory with an `nvidia-smi` like the one WSL maps in from the Windows driver."""
    tools = tmp_path / "gpu-tools"
    tools.mkdir()
    script = tools / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{GPU_LINE}'\n")
    script.chmod(0o755)
    return str(tools)


def backend_for(tmp_path) -> WslBackend:
    return WslBackend(WslConfig(python=sys.executable, data_dir=str(tmp_path / "inside-data")))


def test_preflight_without_wsl_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no wsl.exe at all
    check = backend_for(tmp_path).preflight()
    assert not check.ready and "wsl --install --no-distribution" in check.message


@pytest.mark.parametrize(
    "mode, version, expected",
    [
        ("not-installed", "2.3.26.0", "wsl --install --no-distribution"),
        ("inbox", "", "wsl --update"),
        ("installed", "1.2.5.0", "needs WSL 2.0.0 or newer (this PC has 1.2.5.0)"),
    ],
)
def test_preflight_explains_the_one_step(tmp_path, wsl_bin, mode, version, expected):
    fake_wsl.install(wsl_bin, mode=mode, version=version, honours_utf8=False)  # UTF-16 output, decoded
    check = backend_for(tmp_path).preflight()
    assert not check.ready and expected in check.message


def test_preflight_distribution_missing_or_wsl1(tmp_path, wsl_bin):
    fake = fake_wsl.install(wsl_bin, distributions={"Ubuntu": {"state": "Running", "version": 2}})
    backend = backend_for(tmp_path)
    check = backend.preflight()
    assert not check.ready and "no distribution named Pollinate" in check.message
    assert backend.missing_distribution
    fake.set_distribution("Pollinate", "Stopped", 1)
    check = backend.preflight()
    assert not check.ready and "wsl --set-version Pollinate 2" in check.message


def test_preflight_on_a_stopped_distribution_checks_the_gpu(tmp_path, wsl_bin):
    fake = fake_wsl.install(wsl_bin, distributions={"Pollinate": {"state": "Stopped", "version": 2}})
    backend = backend_for(tmp_path)
    check = backend.preflight()
    assert check.ready and check.message == wsl.NO_GPU_NOTE and backend.gpus == []
    assert fake.state()["distributions"]["Pollinate"]["state"] == "Running"  # the check started it
    fake.update(environment={**fake.state()["environment"], "PATH": gpu_tools(tmp_path) + ":/usr/bin:/bin"})
    check = backend.preflight()
    assert check.ready and check.message == ""
    assert backend.gpus == [wsl.Gpu("NVIDIA GeForce RTX 4090", 24564, "560.94")]
    assert fake.calls()[-1][:5] == ["-d", "Pollinate", "--exec", "sh", "-c"]


def fake_engine_process(tmp_path, backend, qapp) -> EngineProcess:
    data_dir = tmp_path / "app-data"
    data_dir.mkdir(exist_ok=True)

    def command() -> list[str]:
        argv = [sys.executable, FAKE_ENGINE, "--data-dir", backend.config.data_dir, "--exit-on-stdin-eof"]
        return wsl.exec_command("wsl.exe", "Pollinate", argv)

    return EngineProcess(data_dir, command, backend=backend, backoff_s=(0.1,))


@pytest.mark.slow  # several processes: fake wsl.exe, the fake engine behind it
def test_engine_through_wsl_starts_reads_token_and_stops(qtbot, tmp_path, wsl_bin):
    fake = fake_wsl.install(
        wsl_bin,
        distributions={"Pollinate": {"state": "Stopped", "version": 2}},
        environment={"PYTHONPATH": str(ROOT)},
    )
    backend = backend_for(tmp_path)
    engine = fake_engine_process(tmp_path, backend, qtbot)
    notes = []
    engine.notice.connect(notes.append)
    try:
        with qtbot.waitSignal(
            engine.endpoint_changed, timeout=20000, check_params_cb=lambda e: e is not None
        ):
            engine.start()
        assert engine.state == RUNNING and engine.owned
        assert engine.info.token == "fake-token"  # read inside WSL, from the 0600 file
        assert notes == [wsl.NO_GPU_NOTE]
        wsl_exe = psutil.Process(engine._process.pid)
        assert engine.pid != wsl_exe.pid and psutil.Process(engine.pid).ppid() == wsl_exe.pid
        assert fake.state()["distributions"]["Pollinate"]["state"] == "Running"
        inside = engine.pid
    finally:
        engine.stop(timeout_s=10)
    assert not psutil.pid_exists(inside) or psutil.Process(inside).status() == psutil.STATUS_ZOMBIE
    assert engine._process.poll() is not None


@pytest.mark.slow  # several processes: fake wsl.exe, the fake engine behind it
def test_slow_wsl_calls_never_block_the_qt_thread(qtbot, tmp_path, wsl_bin):
    """Each wsl.exe call may take seconds (booting the distribution): the window must keep responding."""
    fake_wsl.install(
        wsl_bin,
        distributions={"Pollinate": {"state": "Stopped", "version": 2}},
        environment={"PYTHONPATH": str(ROOT)},
        delay_s=0.8,
    )
    engine = fake_engine_process(tmp_path, backend_for(tmp_path), qtbot)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start(50)
    qtbot.wait(200)  # ticking before start()
    try:
        with qtbot.waitSignal(engine.endpoint_changed, timeout=60000, check_params_cb=bool):
            engine.start()
    finally:
        timer.stop()
        engine.stop(timeout_s=10)
    # Preflight alone is 3 calls of 0.8 s: run on the Qt thread, no tick would come for 2.4 s.
    longest = max(later - earlier for earlier, later in itertools.pairwise(ticks))
    assert longest < 1.0, f"the Qt thread stood still for {longest:.1f} s"


@pytest.mark.slow  # several processes: fake wsl.exe, the fake engine behind it
def test_the_engine_in_wsl_ends_with_the_app(qtbot, tmp_path, wsl_bin):
    """The app dies without stopping anything: its end of wsl.exe's stdin closes, the engine stops."""
    fake_wsl.install(
        wsl_bin,
        distributions={"Pollinate": {"state": "Running", "version": 2}},
        environment={"PYTHONPATH": str(ROOT)},
    )
    backend = backend_for(tmp_path)
    engine = fake_engine_process(tmp_path, backend, qtbot)
    try:
        with qtbot.waitSignal(
            engine.endpoint_changed, timeout=20000, check_params_cb=lambda e: e is not None
        ):
            engine.start()
        inside = psutil.Process(engine.pid)
        engine._process.stdin.close()  # what Windows does to the pipe when the app's process ends
        inside.wait(timeout=10)
        assert engine._process.wait(timeout=10) == 0
        assert backend.read_state() is None  # it removed its state on the way out
    finally:
        engine.stop(timeout_s=5)


def engine_kept_in_wsl(backend) -> subprocess.Popen:
    """An engine that a previous app run left sharing in the background (not tied to any app)."""
    argv = [sys.executable, FAKE_ENGINE, "--data-dir", backend.config.data_dir]
    kept = subprocess.Popen(wsl.exec_command("wsl.exe", "Pollinate", argv), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while backend.read_state() is None:
        assert time.monotonic() < deadline and kept.poll() is None, "the kept engine did not start"
        time.sleep(0.2)
    return kept


@pytest.mark.slow  # several processes: fake wsl.exe, the fake engine behind it
@pytest.mark.parametrize("ending", ["quit stops it", "it dies"])
def test_app_attaches_to_an_engine_kept_in_wsl(qtbot, tmp_path, wsl_bin, ending):
    fake_wsl.install(
        wsl_bin,
        distributions={"Pollinate": {"state": "Running", "version": 2}},
        environment={"PYTHONPATH": str(ROOT)},
    )
    backend = backend_for(tmp_path)
    backend.ALIVE_CHECK_S = 1.0
    kept = engine_kept_in_wsl(backend)
    engine = fake_engine_process(tmp_path, backend, qtbot)
    try:
        with qtbot.waitSignal(engine.endpoint_changed, timeout=20000, check_params_cb=bool):
            engine.start()
        assert not engine.owned and engine.info.token == "fake-token"
        inside = psutil.Process(engine.pid)
        assert inside.ppid() == kept.pid  # found through wsl.exe: the engine the earlier run left
        if ending == "quit stops it":
            engine.stop(timeout_s=10)  # signalled inside WSL, after its identity was checked there
            assert kept.wait(timeout=10) is not None and not inside.is_running()
        else:
            said = []
            engine.state_changed.connect(lambda _state, message: said.append(message))
            inside.kill()  # noticed by a look inside WSL off the Qt thread, then restarted as ours
            qtbot.waitUntil(lambda: any("stopped unexpectedly" in message for message in said), timeout=20000)
    finally:
        engine.stop(timeout_s=5)
        kept.kill()
        kept.wait()


def test_engine_without_its_distribution_fails_with_the_step(qtbot, tmp_path, wsl_bin):
    fake_wsl.install(wsl_bin, distributions={})
    engine = fake_engine_process(tmp_path, backend_for(tmp_path), qtbot)
    engine.start()
    assert engine.state == "starting"  # the checks run off the Qt thread
    qtbot.waitUntil(lambda: engine.state == FAILED, timeout=10000)
    assert "no distribution named Pollinate" in engine.message


# ---- first run: the distribution is made from the installer's payload, with progress


def setup_payload(tmp_path, script_body: str) -> Path:
    """A payload like the installer's; the script is a stand-in for installers/windows/setup-engine.sh
    (which needs apt-get and PyPI) that speaks the same progress protocol."""
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "rootfs.tar.gz").write_bytes(b"not a real root file system")
    (payload / "pollinate-0.1.0-py3-none-any.whl").write_bytes(b"")
    (payload / "setup-engine.sh").write_text(script_body)
    return payload


def wsl_controller(tmp_path, backend):
    from app.controller import AppController
    from app.settings import Settings

    def command() -> list[str]:
        argv = [sys.executable, FAKE_ENGINE, "--data-dir", backend.config.data_dir, "--exit-on-stdin-eof"]
        return wsl.exec_command("wsl.exe", "Pollinate", argv)

    ctl = AppController(
        Settings(onboarded=True),
        engine_backend=backend,
        engine_command_factory=command,
        use_system_tray=False,
    )
    ctl.confirm_quit = False
    ctl.quit_app = lambda: None
    shown = []
    original = ctl.dashboard_model.on_engine_state
    ctl.dashboard_model.on_engine_state = lambda state, text: (shown.append(text), original(state, text))
    return ctl, shown


@pytest.mark.slow  # several processes: fake wsl.exe, the fake engine behind it
def test_first_run_sets_up_the_distribution_with_progress(qtbot, tmp_path, wsl_bin, monkeypatch):
    marker = tmp_path / "installed-wheel"
    fake = fake_wsl.install(wsl_bin, distributions={}, environment={"MARKER": str(marker)})
    script = (
        'echo "POLLINATE-STEP 1/2 Installing Python"\n'
        'echo "POLLINATE-STEP 2/2 Installing Pollinate"\n'
        'echo "$1" > "$MARKER"\n'
    )
    payload = setup_payload(tmp_path, script)
    monkeypatch.setenv("POLLINATE_WSL_PAYLOAD", str(payload))
    ctl, shown = wsl_controller(tmp_path, backend_for(tmp_path))
    try:
        ctl.start()
        qtbot.waitUntil(lambda: ctl.engine.state == RUNNING, timeout=30000)
        assert "Setting up the engine in WSL (1/2): Installing Python…" in shown
        assert "Setting up the engine in WSL (2/2): Installing Pollinate…" in shown
        calls = fake.calls()
        install_dir = str(ctl.data_dir / "wsl-distribution")
        assert [
            "--import",
            "Pollinate",
            install_dir,
            str(payload / "rootfs.tar.gz"),
            "--version",
            "2",
        ] in calls
        wheel = str(payload / "pollinate-0.1.0-py3-none-any.whl")
        assert [
            "-d",
            "Pollinate",
            "-u",
            "root",
            "--exec",
            "sh",
            str(payload / "setup-engine.sh"),
            wheel,
            "",
        ] in calls
        assert ["--terminate", "Pollinate"] in calls
        assert marker.read_text().strip() == wheel
        assert "POLLINATE-STEP 2/2" in (ctl.data_dir / "logs" / "wsl-setup.log").read_text()
    finally:
        ctl.shutdown()


def test_failed_setup_explains_and_removes_the_half_made_distribution(qtbot, tmp_path, wsl_bin, monkeypatch):
    fake = fake_wsl.install(wsl_bin, distributions={})
    payload = setup_payload(
        tmp_path, 'echo "POLLINATE-STEP 1/6 Installing Python"\necho "E: no network" >&2\nexit 1\n'
    )
    monkeypatch.setenv("POLLINATE_WSL_PAYLOAD", str(payload))
    ctl, shown = wsl_controller(tmp_path, backend_for(tmp_path))
    try:
        ctl.start()
        qtbot.waitUntil(lambda: "failed" in (shown[-1] if shown else ""), timeout=30000)
        assert (
            "Installing the engine in WSL failed (exit code 1)" in shown[-1] and "wsl-setup.log" in shown[-1]
        )
        assert "E: no network" in (ctl.data_dir / "logs" / "wsl-setup.log").read_text()
        qtbot.waitUntil(lambda: "Pollinate" not in fake.state()["distributions"], timeout=10000)
    finally:
        ctl.shutdown()
