"""Each politeness detector on recorded samples: NVML readings (incl. no GPU / no permission), idle times,
battery states, schedule edges, full-screen window lists (X11, Windows, macOS), process lists, CPU times."""

from __future__ import annotations

import datetime as dt
from collections import namedtuple

import pynvml
import pytest

from engine.polite import foreground_macos, foreground_windows, foreground_x11
from engine.polite.battery import BatteryDetector, battery_reading
from engine.polite.cpu import CpuSample, busy_seconds, other_cpu_percent
from engine.polite.exclusive import ExclusiveAppDetector, normalize, running_exclusive
from engine.polite.foreground import Foreground, FullscreenDetector, Unsupported, platform_probe
from engine.polite.gpu import GpuTemperatureDetector, GpuUseDetector, Nvml, other_gpu_percent
from engine.polite.idle import IdleDetector, parse_ioreg, parse_xprintidle, windows_idle_seconds
from engine.polite.idle import Unsupported as IdleUnsupported
from engine.polite.schedule import ScheduleDetector, ScheduleError, parse_schedule, schedule_state

# --- CPU (psutil) ---


def test_other_cpu_percent_leaves_out_our_own_tree():
    before, after = CpuSample(0.0, 100.0, 40.0), CpuSample(2.0, 103.0, 41.0)  # 3 s busy, 1 s ours, 2 cores
    assert other_cpu_percent(before, after, cores=2) == 50.0
    # Our child ended: its CPU time left the sum; that is not negative use.
    assert other_cpu_percent(before, CpuSample(2.0, 101.0, 10.0), cores=2) == 25.0
    assert other_cpu_percent(before, before, cores=2) == 0.0


def test_busy_seconds_excludes_idle_and_iowait():
    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")
    assert busy_seconds(Times(10, 1, 5, 100, 7, 1, 1, 0, 3, 0)) == 18


# --- GPU (NVML) ---

Sample = namedtuple("Sample", "pid timeStamp smUtil memUtil encUtil decUtil")


class RecordedNvml:
    """pynvml's surface with recorded answers; errors are pynvml's own exception classes."""

    NVMLError = pynvml.NVMLError
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, samples=(), temperatures=(61,), init_error=None, samples_error=None):
        self.samples, self.temperatures = list(samples), list(temperatures)
        self.init_error, self.samples_error = init_error, samples_error

    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return len(self.temperatures)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetProcessUtilization(self, handle, since):
        if self.samples_error is not None:
            raise pynvml.NVMLError(self.samples_error)
        return [s for s in self.samples if s.timeStamp >= since]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self.temperatures[handle]


def _now_us():
    import time

    return int(time.time() * 1e6)


def test_other_gpu_percent_takes_each_process_latest_sample_and_skips_ours():
    samples = [Sample(10, 100, 90, 0, 0, 0), Sample(10, 200, 30, 0, 0, 0), Sample(11, 150, 25, 0, 0, 0)]
    samples.append(Sample(99, 200, 70, 0, 0, 0))  # our own engine
    samples.append(Sample(12, 10, 80, 0, 0, 0))  # too old
    assert other_gpu_percent(samples, {99}, since_us=50) == (55.0, {10, 11})


def test_gpu_use_detector_on_a_recorded_game():
    now = _now_us()
    nvml = RecordedNvml([Sample(4242, now - 1000, 87, 40, 0, 0), Sample(7, now - 1000, 3, 0, 0, 0)])
    reading = GpuUseDetector(Nvml(nvml), own_pids=lambda: {7}).read()
    assert reading.supported and reading.value == 87.0 and "4242" in reading.detail


def test_gpu_use_detector_with_no_recent_process_reads_zero():
    reading = GpuUseDetector(Nvml(RecordedNvml(samples_error=pynvml.NVML_ERROR_NOT_FOUND))).read()
    assert reading.value == 0.0


@pytest.mark.parametrize(
    ("init_error", "samples_error", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, None, "no NVIDIA driver"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, None, "no NVIDIA driver"),
        (None, pynvml.NVML_ERROR_NO_PERMISSION, "does not let this user"),
        (None, pynvml.NVML_ERROR_NOT_SUPPORTED, "does not report per-process"),
    ],
)
def test_gpu_detectors_say_why_they_cannot_work(init_error, samples_error, words):
    reading = GpuUseDetector(Nvml(RecordedNvml(init_error=init_error, samples_error=samples_error))).read()
    assert not reading.supported and words in reading.unsupported and reading.value is None


def test_no_gpu_on_this_machine_is_reported_by_the_real_binding():
    # This machine has no NVIDIA driver: the real pynvml fails to initialise, and the detectors say so.
    nvml = Nvml()
    assert "no NVIDIA driver" in GpuUseDetector(nvml).read().unsupported
    assert "no NVIDIA driver" in GpuTemperatureDetector(nvml).read().unsupported


def test_gpu_temperature_is_the_hottest_gpu():
    reading = GpuTemperatureDetector(Nvml(RecordedNvml(temperatures=(55, 88)))).read()
    assert reading.value == 88.0


def test_zero_gpus_is_unsupported():
    assert "no NVIDIA GPU" in GpuUseDetector(Nvml(RecordedNvml(temperatures=()))).read().unsupported


# --- full screen (X11 / Windows / macOS) ---

XPROP_ROOT = "_NET_ACTIVE_WINDOW(WINDOW): window id # 0x4a00007\n"
XPROP_GAME = (
    "_NET_WM_STATE(ATOM) = _NET_WM_STATE_FULLSCREEN, _NET_WM_STATE_FOCUSED\n"
    'WM_CLASS(STRING) = "steam_app_1245620", "steam_app_1245620"\n'
)
XPROP_EDITOR = '_NET_WM_STATE(ATOM) = _NET_WM_STATE_MAXIMIZED_VERT\nWM_CLASS(STRING) = "code", "Code"\n'


def test_x11_parsing_of_recorded_xprop_output():
    assert foreground_x11.parse_active_window(XPROP_ROOT) == "0x4a00007"
    assert foreground_x11.parse_active_window("_NET_ACTIVE_WINDOW(WINDOW): window id # 0x0") is None
    assert foreground_x11.parse_window(XPROP_GAME) == Foreground("steam_app_1245620", True)
    assert foreground_x11.parse_window(XPROP_EDITOR) == Foreground("Code", False)
    assert foreground_x11.parse_window("_NET_WM_STATE:  not found.\n") == Foreground("unknown window", False)


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"WAYLAND_DISPLAY": "wayland-0"}, "Wayland does not let applications see other windows"),
        ({}, "no graphical session"),
    ],
)
def test_x11_part_says_why_it_is_unsupported(environ, words):
    with pytest.raises(Unsupported, match=words):
        foreground_x11.probe(environ)
    reading = FullscreenDetector(platform_probe("linux", environ)).read()
    assert not reading.supported and words in reading.unsupported


def test_windows_fullscreen_decision():
    monitor = (0, 0, 2560, 1440)
    assert foreground_windows.is_fullscreen(
        foreground_windows.QUNS_RUNNING_D3D_FULL_SCREEN, None, None, False
    )
    assert foreground_windows.is_fullscreen(5, (0, 0, 2560, 1440), monitor, is_desktop=False)
    assert not foreground_windows.is_fullscreen(5, (0, 0, 2560, 1400), monitor, is_desktop=False)
    assert not foreground_windows.is_fullscreen(5, (0, 0, 2560, 1440), monitor, is_desktop=True)
    # A borderless window on the second monitor covers that monitor.
    assert foreground_windows.covers_monitor((2560, -8, 5128, 1448), (2560, 0, 5120, 1440))


def test_windows_part_off_windows_is_unsupported():
    with pytest.raises(Unsupported, match="native Windows process"):
        foreground_windows.probe()


MAC_WINDOWS = [
    {"kCGWindowLayer": 25, "kCGWindowOwnerName": "SystemUIServer", "kCGWindowBounds": {}},
    {
        "kCGWindowLayer": 0,
        "kCGWindowOwnerName": "Baldur's Gate 3",
        "kCGWindowBounds": {"X": 0, "Y": 0, "Width": 1728, "Height": 1117},
    },
    {"kCGWindowLayer": 0, "kCGWindowOwnerName": "Finder", "kCGWindowBounds": {"X": 0, "Y": 0, "Width": 800}},
]


def test_macos_fullscreen_from_a_recorded_window_list():
    assert foreground_macos.fullscreen_app(MAC_WINDOWS, [(0, 0, 1728, 1117)]) == Foreground(
        "Baldur's Gate 3", True
    )
    assert foreground_macos.fullscreen_app(MAC_WINDOWS[2:], [(0, 0, 1728, 1117)]) == Foreground(
        "Finder", False
    )
    assert foreground_macos.fullscreen_app([], [(0, 0, 1, 1)]) == Foreground("", False)


def test_fullscreen_detector_wraps_a_probe():
    assert FullscreenDetector(lambda: Foreground("game", True)).read().value == 1.0
    broken = FullscreenDetector(lambda: 1 / 0).read()
    assert broken.supported and broken.value is None and "could not read" in broken.detail


# --- exclusive applications ---


def test_exclusive_app_matching():
    running = ["systemd", "EldenRing.exe", "C:\\Program Files\\Steam\\steam.exe", "python3"]
    assert normalize("C:\\Games\\Game.EXE") == "game"
    assert running_exclusive(running, ["eldenring", "Steam*", " "]) == ["eldenring", "steam"]
    assert running_exclusive(running, []) == []
    reading = ExclusiveAppDetector(lambda: ["steam"], lister=lambda: running).read()
    assert reading.value == 1.0 and reading.detail == "steam"


def test_exclusive_app_detector_lists_real_processes():
    import os

    import psutil

    me = normalize(psutil.Process(os.getpid()).name())
    assert ExclusiveAppDetector(lambda: [me]).read().value == 1.0
    assert ExclusiveAppDetector(lambda: ["no-such-program-xyz"]).read().value == 0.0


# --- user idle time ---


def test_idle_parsers_on_recorded_output():
    assert parse_xprintidle("123456\n") == 123.456
    assert parse_ioreg('  |   "HIDIdleTime" = 42000000000\n') == 42.0
    with pytest.raises(IdleUnsupported):
        parse_ioreg("nothing here")
    assert windows_idle_seconds(5000, 2000) == 3.0
    assert windows_idle_seconds(1000, 0xFFFFFFFF - 999) == 2.0  # GetTickCount wrapped


def test_idle_detector_reports_unsupported_and_values():
    def headless():
        raise IdleUnsupported("no X11 session")

    assert IdleDetector(headless).read().unsupported == "no X11 session"
    assert IdleDetector(lambda: 12.5).read().value == 12.5


# --- battery ---

Battery = namedtuple("Battery", "percent secsleft power_plugged")


@pytest.mark.parametrize(
    ("battery", "value", "detail"),
    [
        (None, 0.0, "no battery"),
        (Battery(64.0, 7200, False), 1.0, "64%"),
        (Battery(99.6, -2, True), 0.0, "100%"),
        (Battery(50.0, -1, None), None, "power source unknown"),
    ],
)
def test_battery_states(battery, value, detail):
    reading = battery_reading(battery)
    assert reading.value == value and detail in reading.detail
    assert BatteryDetector(lambda: battery).read() == reading


# --- weekly schedule ---


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 23 + day, hour, minute)  # 2026-11-23 is a Monday


def test_schedule_edges():
    windows = parse_schedule(["mon-fri 18:00-23:00", "sat 00:00-24:00", "sun 22:00-06:00"])
    assert schedule_state(at(0, 17, 59), windows) == (False, at(0, 18))
    assert schedule_state(at(0, 18), windows) == (True, at(0, 23))
    assert schedule_state(at(0, 23), windows) == (False, at(1, 18))  # the end is exclusive
    assert schedule_state(at(4, 22), windows) == (True, at(4, 23))
    assert schedule_state(at(5, 12), windows) == (True, at(6, 0))  # Saturday all day, until Sunday 00:00
    # Sunday 22:00 runs overnight into Monday 06:00 (the week wraps).
    assert schedule_state(at(6, 23), windows) == (True, at(7, 6))
    assert schedule_state(at(0, 3), windows) == (True, at(0, 6))
    assert schedule_state(at(0, 6), windows) == (False, at(0, 18))
    assert schedule_state(at(2, 12), []) == (True, None)


def test_schedule_entries_are_validated():
    for bad in ("monday 10:00-11:00", "mon 25:00-26:00", "mon 10:60-11:00", "10:00-11:00"):
        with pytest.raises(ScheduleError):
            parse_schedule([bad])
    assert parse_schedule(["fri-mon 00:00-24:00"]) == [(0, 1440), (4 * 1440, 7 * 1440)]


def test_schedule_detector_says_until_when():
    detector = ScheduleDetector(lambda: ["mon 18:00-23:00"], clock=lambda: at(0, 12))
    reading = detector.read()
    assert reading.value == 1.0 and reading.until == at(0, 18).timestamp()
    assert ScheduleDetector(lambda: ["bad"], clock=lambda: at(0, 12)).read().value is None


def test_the_real_cpu_detector_reads_this_machine():
    from engine.polite.cpu import CpuDetector

    detector = CpuDetector()
    assert detector.read().value is None  # the first read takes the baseline
    reading = detector.read()
    assert reading.supported and 0.0 <= reading.value <= 100.0
