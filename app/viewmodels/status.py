"""What the app as a whole is doing, reduced from the engine process state and the engine's /api/status."""

from __future__ import annotations

from contract import MOVE_WORDS

TRAY_STATES = ("idle", "loading", "serving", "paused", "error")

TRAY_TOOLTIPS = {
    "idle": "Pollinate: not sharing",
    "loading": "Pollinate: loading blocks…",
    "serving": "Pollinate: sharing your GPU",
    "paused": "Pollinate: paused",
    "error": "Pollinate: needs attention",
}


def tray_state(engine_state: str, status: dict | None) -> str:
    """The tray icon's state: error, loading (engine starting or blocks loading), serving, paused or idle."""
    if engine_state == "failed":
        return "error"
    if engine_state in ("starting", "restarting"):
        return "loading" if engine_state == "starting" else "paused"
    if engine_state != "running" or not status:
        return "paused" if engine_state == "stopped" else "idle"
    state = status.get("state")
    if state == "error":
        return "error"
    if state == "loading" or (state == "draining" and status.get("move")):
        return "loading"  # a move loads its new span: sharing goes on
    if state == "serving":
        return "serving"
    if state in ("draining", "paused"):
        return "paused"
    return "idle"


def tray_tooltip(engine_state: str, engine_message: str, status: dict | None) -> str:
    from app.viewmodels.pause import is_paused, pause_text

    state = tray_state(engine_state, status)
    text = TRAY_TOOLTIPS[state]
    moving = move_text(status) if engine_state == "running" else None
    if moving:
        return "Pollinate: " + moving[:1].lower() + moving[1:]
    if engine_state == "running" and is_paused(status):
        return "Pollinate: " + pause_text(status)[:1].lower() + pause_text(status)[1:]
    if status and status.get("state") == "serving" and status.get("blocks"):
        start, end = status["blocks"]
        text += f" (blocks {start}–{end - 1} of {status.get('model') or 'the model'})"
    elif state == "error" or engine_state != "running":
        detail = engine_message or (status or {}).get("message") or ""
        if detail:
            text += f"\n{detail}"
    elif status and status.get("message"):
        text += f"\n{status['message']}"
    return text


def move_text(status: dict | None) -> str | None:
    """What the app says while the hosted span moves to other blocks (the typed `status.move`), else None."""
    move = (status or {}).get("move")
    if not move or not move.get("to_blocks"):
        return None
    start, end = move["to_blocks"]
    text = f"Moving to blocks {start}–{end - 1} of {status.get('model') or 'the model'}"
    why = MOVE_WORDS.get(move.get("reason"))
    return f"{text} ({why})…" if why else f"{text}…"
