"""Dashboard view model: hardware, hosting plan, sharing state, contribution over time, swarm coverage."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from app.api_client import ApiClient, ApiError, describe_error
from app.qt import QObject, QTimer, Signal
from contract import CPU_MEMORY_SHARE, QUANT_WORDS

HISTORY_POINTS = 900  # 15 minutes of once-a-second stats


@dataclass(frozen=True)
class BlockCell:
    """One transformer block in the coverage picture."""

    index: int
    servers: int | None  # None: not known yet (the swarm is still being discovered, or unreachable)
    mine: bool


@dataclass(frozen=True)
class ShareControl:
    """How the Share toggle looks."""

    text: str
    checked: bool
    enabled: bool
    progress: float | None  # 0..1 while loading, None otherwise
    busy: bool


@dataclass(frozen=True)
class DashboardSnapshot:
    """Everything the dashboard shows; replaced (never mutated) by the reducers below."""

    engine_state: str = "stopped"
    engine_message: str = ""
    status: dict | None = None
    stats: dict | None = None
    stats_at: float = 0.0  # when `stats` arrived (the engine sends no event when only time passes)
    status_at: float = 0.0  # when `status` arrived
    history: tuple[tuple[float, float, float], ...] = ()  # (time, tokens_served, requests_served)
    hardware: dict | None = None
    plan: dict | None = None
    swarm: dict | None = None
    swarm_error: str | None = None  # why the last swarm read failed (the map then shows no data)
    serving_since: float | None = None  # when hosting turned to serving (the sharing clock runs from it)
    pending: str | None = None  # "start"/"stop" while that request is in flight
    error: str | None = None


def with_engine(snapshot: DashboardSnapshot, state: str, message: str) -> DashboardSnapshot:
    if state == "running":
        return dataclasses.replace(snapshot, engine_state=state, engine_message=message)
    # A stopped or restarting engine (perhaps joining another swarm next): what it said no longer holds.
    return dataclasses.replace(
        snapshot,
        engine_state=state,
        engine_message=message,
        status=None,
        plan=None,
        swarm=None,
        swarm_error=None,
        serving_since=None,
        history=(),
    )


def with_status(snapshot: DashboardSnapshot, status: dict, now: float = 0.0) -> DashboardSnapshot:
    error = status.get("message") if status.get("state") == "error" else None
    serving = status.get("state") == "serving"
    was_serving = (snapshot.status or {}).get("state") == "serving"
    since = (snapshot.serving_since if was_serving else now) if serving else None
    history = snapshot.history
    if was_serving and not serving and history:
        # Sharing stopped: the served-tokens rate drops to zero now, not whenever the next stats arrive.
        history = (*history, (now, *history[-1][1:]))[-HISTORY_POINTS:]
    pending = snapshot.pending
    if pending == "start" and status.get("state") == "error" and not status.get("ready"):
        pending = None  # it waited for the engine to join its swarm, and the join failed
    return dataclasses.replace(
        snapshot,
        status=dict(status),
        status_at=now,
        error=error,
        serving_since=since,
        history=history,
        pending=pending,
    )


def with_swarm(
    snapshot: DashboardSnapshot, swarm: dict | None, error: str | None = None
) -> DashboardSnapshot:
    """A swarm read: its answer, or (swarm None) why it failed: then the map shows no data, not old data."""
    return dataclasses.replace(snapshot, swarm=swarm, swarm_error=error)


def with_stats(snapshot: DashboardSnapshot, stats: dict, now: float) -> DashboardSnapshot:
    point = (now, float(stats.get("tokens_served") or 0), float(stats.get("requests_served") or 0))
    history = (*snapshot.history, point)[-HISTORY_POINTS:]
    return dataclasses.replace(snapshot, stats=dict(stats), stats_at=now, history=history)


def displayed_stats(snapshot: DashboardSnapshot, now: float) -> dict | None:
    """The last stats with the clocks moved on to `now`: uptime always, sharing time while serving.

    The sharing clock runs from the later of the last stats and the moment serving began (never from any
    other status event, which made it jump back), for this run's and the lifetime total alike.
    """
    if snapshot.stats is None:
        return None
    stats = dict(snapshot.stats)
    elapsed = max(0.0, now - snapshot.stats_at)
    stats["uptime_seconds"] = float(stats.get("uptime_seconds") or 0) + elapsed
    if snapshot.engine_state != "running":  # no engine, no uptime (the lifetime totals stay)
        stats["uptime_seconds"] = None
    if snapshot.serving_since is not None:
        serving_for = max(0.0, now - max(snapshot.stats_at, snapshot.serving_since))
        for key in ("hosting_seconds", "lifetime_hosting_seconds"):
            stats[key] = float(stats.get(key) or 0) + serving_for
    if join_failed(snapshot):  # points and priority belong to a swarm, and the engine is in none
        stats["points"] = stats["priority"] = None
    return stats


def tokens_rate(snapshot: DashboardSnapshot, now: float, stale_after: float = 5.0) -> float | None:
    """Tokens served per second now; 0 when not serving or when no stats came for a while."""
    if (snapshot.status or {}).get("state") != "serving" or now - snapshot.stats_at > stale_after:
        return 0.0 if snapshot.stats is not None else None
    series = rate_series(snapshot.history)
    return series[-1][1] if series else 0.0


def rate_series(
    history: tuple[tuple[float, float, float], ...], column: int = 1
) -> list[tuple[float, float]]:
    """Per-second rate of a cumulative counter between consecutive points: [(time, rate)]."""
    series = []
    for (t0, *v0), (t1, *v1) in itertools.pairwise(history):
        if t1 > t0:
            series.append((t1, max(0.0, (v1[column - 1] - v0[column - 1]) / (t1 - t0))))
    return series


def share_control(snapshot: DashboardSnapshot) -> ShareControl:
    """The Share toggle's text, check state, progress and whether it can be clicked now."""
    if snapshot.engine_state != "running":
        return ShareControl("Share my GPU", False, False, None, False)
    if snapshot.status is None:  # the process runs; how the engine is comes with its first status
        return ShareControl("Connecting…", False, False, None, True)
    state = (snapshot.status or {}).get("state", "idle")
    if (
        (snapshot.status or {}).get("move")
        and state in ("draining", "loading")
        and snapshot.pending != "stop"
    ):
        # Sharing goes on while the span moves to other blocks; a click stops it.
        progress = (snapshot.status or {}).get("progress") if state == "loading" else None
        return ShareControl(
            "Moving to other blocks…", True, True, float(progress) if progress is not None else None, True
        )
    if snapshot.pending == "start" or state == "loading":
        progress = (snapshot.status or {}).get("progress")
        return ShareControl(
            "Loading blocks…", True, True, float(progress) if progress is not None else 0.0, True
        )
    if join_failed(snapshot):  # nothing to share with until the engine joins a swarm
        return ShareControl("Share my GPU", False, False, None, False)
    if (snapshot.status or {}).get("ready") is False and state == "idle":
        # Before ready the engine may prepare the demo model (first start): show how far it got.
        progress = (snapshot.status or {}).get("progress")
        if progress is not None:
            return ShareControl("Preparing the demo model…", False, False, float(progress), True)
        return ShareControl("Joining the swarm…", False, False, None, True)
    if state == "draining" and (snapshot.status or {}).get("pause"):
        return ShareControl("Pausing…", True, False, None, True)
    if snapshot.pending == "stop" or state == "draining":
        return ShareControl("Stopping…", False, False, None, True)
    if state == "paused":  # sharing stays on: it resumes by itself (or with Resume)
        return ShareControl("Paused — click to stop sharing", True, True, None, False)
    if state == "serving":
        return ShareControl("Sharing — click to stop", True, True, None, False)
    return ShareControl("Share my GPU", False, True, None, False)


def coverage(snapshot: DashboardSnapshot) -> list[BlockCell]:
    """Blocks of the model with servers per block and whether this computer hosts each one."""
    swarm, plan, status = snapshot.swarm or {}, snapshot.plan or {}, snapshot.status or {}
    total = int(swarm.get("total_blocks") or plan.get("total_blocks") or 0)
    # Before the first swarm read, after a failed one, or without a swarm at all: no counts.
    known = snapshot.swarm is not None and not join_failed(snapshot)
    servers = {int(b["index"]): int(b.get("servers") or 0) for b in swarm.get("blocks") or [] if "index" in b}
    mine = set()
    if status.get("state") in ("serving", "loading") and status.get("blocks"):
        mine = set(range(*status["blocks"]))
    return [BlockCell(i, servers.get(i, 0) if known else None, i in mine) for i in range(total)]


def join_failed(snapshot: DashboardSnapshot) -> bool:
    """The engine runs but could not join its swarm (e.g. the public swarm without internet)."""
    status = snapshot.status or {}
    return snapshot.engine_state == "running" and status.get("state") == "error" and not status.get("ready")


def swarm_note(snapshot: DashboardSnapshot) -> str:
    """What the block map shows when it has no counts: discovering, or why there is no data."""
    if join_failed(snapshot):
        return "No data about the swarm: the engine could not join it."
    if snapshot.swarm is not None or snapshot.engine_state != "running":
        return ""
    if snapshot.swarm_error:
        return f"No data about the swarm: {snapshot.swarm_error}"
    return "Discovering the swarm…"


def planned_blocks(snapshot: DashboardSnapshot) -> range:
    plan = snapshot.plan or {}
    if plan.get("start_block") is None or plan.get("end_block") is None:
        return range(0)
    return range(int(plan["start_block"]), int(plan["end_block"]))


def format_bytes(value: float | None) -> str:
    if value is None:
        return "?"
    value = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def format_duration(seconds: float | None) -> str:
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def hardware_lines(hardware: dict | None) -> list[str]:
    """Short lines describing the GPU(s), or CPU and RAM when there is no GPU."""
    if not hardware:
        return ["Hardware: unknown until the engine runs"]
    lines = [
        f"{gpu.get('name', 'GPU')} ({gpu.get('backend', '')}): {format_bytes(gpu.get('free_bytes'))} free "
        f"of {format_bytes(gpu.get('total_bytes'))}"
        for gpu in hardware.get("gpus") or []
    ]
    if not lines:
        cpu, ram = hardware.get("cpu") or {}, hardware.get("ram") or {}
        lines.append("No GPU found: hosting uses the CPU (slow)")
        lines.append(f"CPU: {cpu.get('name') or 'unknown'}, {cpu.get('cores') or '?'} cores")
        lines.append(
            f"RAM: {format_bytes(ram.get('available_bytes'))} available"
            f" of {format_bytes(ram.get('total_bytes'))}"
        )
    disk = hardware.get("disk") or {}
    if disk:
        lines.append(f"Disk ({disk.get('path', '')}): {format_bytes(disk.get('free_bytes'))} free")
    return lines


def shareable_memory(hardware: dict | None, plan: dict | None, fraction: float) -> tuple[float | None, str]:
    """(bytes, "GPU memory" or "RAM"): the memory the user's share (the Settings slider) is taken of.

    The engine's plan for that share says it best (budget = shareable x share); without one, the hardware:
    a GPU's free memory, else the part of the available RAM that hosting on the CPU may use at all.
    """
    plan = plan or {}
    if plan.get("budget_bytes") and fraction > 0:
        name = "GPU memory" if plan.get("memory_kind") == "gpu" else "RAM"
        return float(plan["budget_bytes"]) / fraction, name
    hardware = hardware or {}
    gpus = hardware.get("gpus") or []
    if gpus:
        return gpus[0].get("free_bytes"), "GPU memory"
    available = (hardware.get("ram") or {}).get("available_bytes")
    if available:
        return float(available) * CPU_MEMORY_SHARE, "RAM"
    return None, "memory"


def plan_text(plan: dict | None) -> str:
    """The plan in words: which blocks, at which precision, and how much of which memory (GPU memory or
    RAM) in GB, against the share the user allowed."""
    if not plan:
        return "No hosting plan yet."
    blocks = f"blocks {plan.get('start_block')}–{int(plan.get('end_block') or 0) - 1}"
    memory = "GPU memory" if plan.get("memory_kind") == "gpu" else "RAM"
    budget = plan.get("budget_bytes")
    share = f" of the {format_bytes(budget)} share you allow" if budget else ""
    return (
        f"{plan.get('model')}: {blocks} ({plan.get('num_blocks')} of {plan.get('total_blocks')}), "
        f"{QUANT_WORDS.get(plan.get('quant'), plan.get('quant'))}, "
        f"using about {format_bytes(plan.get('total_bytes'))} of {memory}{share} "
        f"(weights {format_bytes(plan.get('weights_bytes'))} + cache {format_bytes(plan.get('cache_bytes'))})"
    )


class DashboardModel(QObject):
    """Holds a DashboardSnapshot built from engine events; runs the sharing actions; emits `changed`."""

    changed = Signal()
    error = Signal(object, str)  # ApiError, what was being done
    sharing_requested = Signal(bool)

    SWARM_REFRESH_MS = 15_000

    def __init__(self, client: ApiClient, hosting_options=lambda: {}, parent: QObject | None = None):
        super().__init__(parent)
        self.client = client
        self.hosting_options = hosting_options
        self.snapshot = DashboardSnapshot()
        self._start_when_ready = False  # the user asked to share while the engine was still joining
        self._swarm_call = None  # the swarm read in flight
        self._swarm_again = False  # another read was asked for while one was in flight
        self._swarm_timer = QTimer(self)
        self._swarm_timer.setInterval(self.SWARM_REFRESH_MS)
        self._swarm_timer.timeout.connect(self.refresh_swarm)

    def _replace(self, snapshot: DashboardSnapshot) -> None:
        self.snapshot = snapshot
        self.changed.emit()

    def on_engine_state(self, state: str, message: str) -> None:
        if state != "running":
            self._start_when_ready = False
        self._replace(with_engine(self.snapshot, state, message))
        if state == "running":
            self.refresh_all()
            self._swarm_timer.start()
        else:
            self._swarm_timer.stop()

    def on_status(self, status: dict) -> None:
        previous = (self.snapshot.status or {}).get("state")
        self._replace(with_status(self.snapshot, status, time.time()))
        if join_failed(self.snapshot):
            self._start_when_ready = False  # a Retry restarts the engine, which resumes sharing itself
        if self._start_when_ready and status.get("ready") and status.get("state") == "idle":
            self._start_when_ready = False
            self.set_sharing(True)
        if status.get("state") != previous:
            self.refresh_swarm()
        # The plan needs a ready engine (503 engine_not_ready before), and it changes once hosting starts.
        if status.get("ready") and (self.snapshot.plan is None or status.get("state") != previous):
            self.refresh_plan()

    def on_stats(self, stats: dict) -> None:
        self._replace(with_stats(self.snapshot, stats, time.time()))

    def refresh_all(self) -> None:
        self.client.get("/api/hardware").succeeded.connect(
            lambda data: self._replace(dataclasses.replace(self.snapshot, hardware=data))
        )
        self.refresh_plan()
        self.refresh_swarm()

    def _model_query(self) -> str:
        model = self.hosting_options().get("model") or (self.snapshot.status or {}).get("model")
        return f"?model={quote(model)}" if model else ""

    def refresh_plan(self) -> None:
        """Ask for the plan of the chosen model, quantization and memory share (they follow Settings)."""
        options = self.hosting_options()
        query = {
            "model": options.get("model") or (self.snapshot.status or {}).get("model"),
            "quant": options.get("quant"),
            "memory_fraction": options.get("memory_fraction"),
        }
        text = urlencode({k: v for k, v in query.items() if v not in (None, "")})
        call = self.client.get("/api/hosting/plan" + (f"?{text}" if text else ""))
        call.succeeded.connect(lambda data: self._replace(dataclasses.replace(self.snapshot, plan=data)))

    def refresh_swarm(self) -> None:
        """Read the swarm's coverage; one read at a time (a slow engine must not get a pile of them: each
        holds one of its worker threads), and one more after it when asked meanwhile."""
        if self._swarm_call is not None:
            self._swarm_again = True
            return
        model = (self.snapshot.plan or {}).get("model")
        query = f"?model={quote(model)}" if model else self._model_query()
        call = self._swarm_call = self.client.get("/api/swarm" + query)
        call.succeeded.connect(self._swarm_loaded)
        call.failed.connect(self._swarm_failed)

    def _swarm_loaded(self, data: dict) -> None:
        self._replace(with_swarm(self.snapshot, data))
        self._swarm_done()

    def _swarm_failed(self, error: ApiError) -> None:
        if error.type != "engine_not_ready" and self.snapshot.engine_state == "running":
            self._replace(with_swarm(self.snapshot, None, describe_error(error)))
        # (still joining: "discovering" stays)
        self._swarm_done()

    def _swarm_done(self) -> None:
        self._swarm_call = None
        if self._swarm_again:
            self._swarm_again = False
            self.refresh_swarm()

    def set_sharing(self, on: bool) -> None:
        """Start or stop hosting; the outcome arrives through the status events."""
        state = (self.snapshot.status or {}).get("state", "idle")
        moving = bool((self.snapshot.status or {}).get("move"))
        if (on and state in ("loading", "serving", "paused")) or (
            (not on and state in ("idle", "error")) or (not on and state == "draining" and not moving)
        ):
            return
        self.sharing_requested.emit(on)
        self._replace(dataclasses.replace(self.snapshot, pending="start" if on else "stop", error=None))
        if on:
            body = {k: v for k, v in self.hosting_options().items() if v not in (None, "", "auto")}
            call = self.client.post("/api/hosting/start", body)
        else:
            call = self.client.post("/api/hosting/stop", {"grace_seconds": 10.0})
        call.succeeded.connect(self._action_done)
        call.failed.connect(
            lambda err, on=on: self._action_failed(err, "start sharing" if on else "stop sharing")
        )

    def set_memory_share(self, fraction: float) -> None:
        """The memory share changed in Settings: an "auto" hosting grows or shrinks to it now (the engine
        moves the span without a restart; the status shows the move). Nothing to do while not sharing."""
        if (self.snapshot.status or {}).get("state", "idle") in ("idle", "error"):
            return
        call = self.client.post("/api/hosting/resize", {"memory_fraction": fraction})
        call.succeeded.connect(self._action_done)
        call.failed.connect(
            lambda err: None if err.status == 409 else self._action_failed(err, "change the memory share")
        )

    def pause(self, seconds: float | None = None, until: float | None = None) -> None:
        """Pause sharing for `seconds`, until `until` (epoch), or until resumed (the memory is freed)."""
        body = {k: v for k, v in (("seconds", seconds), ("until", until)) if v is not None}
        call = self.client.post("/api/hosting/pause", body)
        call.succeeded.connect(self._action_done)
        call.failed.connect(lambda err: self._action_failed(err, "pause sharing"))

    def resume(self) -> None:
        """End a pause now (a pause the user chose, or one a policy keeps while its cause lasts)."""
        call = self.client.post("/api/hosting/resume", {})
        call.succeeded.connect(self._action_done)
        call.failed.connect(lambda err: self._action_failed(err, "resume sharing"))

    def _action_done(self, status: dict) -> None:
        snapshot = dataclasses.replace(self.snapshot, pending=None)
        if isinstance(status, dict) and "state" in status:
            snapshot = with_status(snapshot, status, time.time())
        self._replace(snapshot)

    def _action_failed(self, error: ApiError, doing: str) -> None:
        self._replace(dataclasses.replace(self.snapshot, pending=None))
        if error.type == "engine_not_ready" and doing == "start sharing":
            # Still joining the swarm: start as soon as the status event says it is ready (the engine sends
            # one when `ready` changes), or now if that event came before this answer.
            if (self.snapshot.status or {}).get("ready"):
                self.set_sharing(True)
                return
            self._start_when_ready = True
            self._replace(dataclasses.replace(self.snapshot, pending="start"))
            return
        if error.status != 409:  # 409: already in the asked state (another client did it)
            self.error.emit(error, doing)
