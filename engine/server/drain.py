"""Drain: how a block server steps aside without breaking anyone's chat (the records of BlockHost.drain).

`BlockHost.drain(grace_seconds, mode, reason)` is the one entry point (pausing for a game, stopping,
rebalancing):

1. announce OFFLINE, so clients stop routing new sessions here (their next swarm refresh drops us);
2. refuse new requests at once with a clear error saying why (`reason`: pausing, moving to other blocks,
   leaving); a client with a stale view bans us and reroutes whatever the reason;
3. let open inference sessions run for up to `grace_seconds`;
4. end the sessions still open: their next step fails, and our client replays its history to another server
   (the same tokens, as after a kill; the KV caches here are freed as each session closes);
5. mode RELEASE: remove the RPC handlers, stop the compute loop and free the weights (the host is then
   STOPPED; sharing again needs a new BlockHost). Mode HOLD: keep the weights loaded and the handlers
   registered, only stop accepting work (the host is PAUSED; `BlockHost.resume()` announces ONLINE again
   in about a second).

HOLD suits short pauses (a user-chosen pause of minutes, a detector that clears soon): resuming costs one
DHT announcement. RELEASE suits a game that needs the VRAM, or any pause longer than reloading takes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DrainMode(enum.Enum):
    """What a drained host keeps."""

    HOLD = "hold"  # weights stay loaded; resume() serves again at once
    RELEASE = "release"  # weights, caches and handlers are freed; the host is stopped


@dataclass(frozen=True)
class DrainReport:
    """What a drain did, for logs, status pages and benches."""

    mode: DrainMode
    grace_seconds: float
    sessions_at_start: int  # inference sessions open when the drain began
    sessions_ended: int  # of those, still open after the grace period and ended by us
    quiet_seconds: float  # from the start until no session was open
    total_seconds: float  # from the start until the drain returned (weights freed, for RELEASE)
