"""Paused sharing in words, and the ends of the pauses the user can choose (tray and dashboard)."""

from __future__ import annotations

import datetime as dt

PAUSE_HOUR_SECONDS = 3600.0
TOMORROW_HOUR = 8  # "until tomorrow" ends at 08:00 local time


def until_tomorrow(now: dt.datetime) -> float:
    """Epoch seconds of tomorrow at 08:00 local time (a pause "until tomorrow")."""
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=TOMORROW_HOUR, minute=0, second=0, microsecond=0)
    return tomorrow.timestamp()


def is_paused(status: dict | None) -> bool:
    """Paused, or draining on the way to a pause."""
    status = status or {}
    return status.get("state") == "paused" or (
        status.get("state") == "draining" and bool(status.get("pause"))
    )


def pause_text(status: dict | None, now: dt.datetime | None = None) -> str:
    """'Paused: <why> — until <when>' for a paused status ('' otherwise)."""
    if not is_paused(status):
        return ""
    pause = status.get("pause") or {}
    message = pause.get("message") or "Paused"
    if pause.get("source") == "user":
        return message  # the engine says "Paused by you until …" itself
    until = pause.get("until")
    if until:
        now = now or dt.datetime.now()
        when = dt.datetime.fromtimestamp(until)
        day = "" if when.date() == now.date() else when.strftime("%a ")
        return f"Paused: {message} — until {day}{when:%H:%M}"
    return f"Paused: {message} — sharing resumes by itself when that clears"


def pause_actions(status: dict | None) -> tuple[bool, bool]:
    """(the user can pause now, the user can resume now): pause while serving; resume the user's own pause
    (a policy's pause ends by itself when its cause clears; Settings changes what pauses)."""
    status = status or {}
    can_pause = status.get("state") == "serving"
    can_resume = status.get("state") == "paused" and (status.get("pause") or {}).get("source") == "user"
    return can_pause, can_resume
