"""Pausing: step aside for the owner of the machine (a game, a busy CPU, "pause for 1 hour") and come back.

The pause half of the Hosting part (engine/service/hosting.py), whose state it shares. A pause drains the
user's BlockHost (engine/server/drain.py): in HOLD mode the weights stay loaded and resuming takes one DHT
announcement; in RELEASE mode the weights and caches are freed and resuming loads them again. The status
says why sharing is paused and until when (`status["pause"]`); sharing time stops counting while paused.
Who pauses: the user (through the API) or the politeness monitor (engine/polite), which never overrides a
pause the user chose. A paused host is never moved or resized (engine/service/moving.py); a move under way
is not paused (the monitor pauses once it serves again), and a pause that freed the weights ends the
hosting's Rebalancer, so resuming plans the span afresh (after a held pause: one rebalancing round at once).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from contract import HostingState, Pause, PauseMode, PauseSource
from engine.service.errors import InvalidRequestError, WrongStateError

logger = logging.getLogger(__name__)


class PauseMixin:
    """pause_sharing / resume_sharing / release_paused for the hosting state machine (mixed into Hosting
    only: it works on Hosting's own state)."""

    _last_device: str | None = None
    _throttle: tuple[int | None, float] = (None, 1.0)

    @property
    def throttle(self) -> tuple[int | None, float]:
        """(max_sessions, compute_share) now in force."""
        return self._throttle

    def set_throttle(self, max_sessions: int | None, compute_share: float) -> None:
        """The cap on what sharing uses while active (the policy settings); applies to the current host and
        to every later one."""
        self._throttle = (max_sessions, compute_share)
        host = self._host
        if host is not None:
            host.set_throttle(max_sessions, compute_share)

    def hosting_device(self) -> str | None:
        """ "cpu", "cuda", ... for the user's hosting, also while paused with the weights freed; else None.

        The politeness rules that depend on it (CPU use counts when hosting on the CPU) must hold for the
        whole pause, or a released pause would end itself.
        """
        host = self._host
        info = host.info() if host is not None else None
        if info is not None and info.device:
            self._last_device = info.device.split(":")[0]
            return self._last_device
        active = (HostingState.PAUSED, HostingState.DRAINING, HostingState.LOADING)
        return self._last_device if self.core.status_record.state in active else None

    def pause_for(
        self,
        seconds: float | None = None,
        until: float | None = None,
        release: bool = True,
        grace_seconds: float | None = None,
    ) -> dict[str, Any]:
        """The user's pause (/api/hosting/pause): for `seconds`, until `until` (epoch), or until resumed."""
        now = time.time()
        if seconds is not None and until is not None:
            raise InvalidRequestError("give either seconds or until, not both")
        if seconds is not None:
            until = now + seconds
        if until is not None and until <= now:
            raise InvalidRequestError("until is in the past: give a time later than now (epoch seconds)")
        if until is None:
            message = "Paused by you until you resume"
        else:
            message = "Paused by you until " + time.strftime("%a %H:%M", time.localtime(until))
        return self.pause_sharing(
            "user", message, until=until, release=release, grace_seconds=grace_seconds, source="user"
        )

    def pause_sharing(
        self,
        reason: str,
        message: str,
        *,
        until: float | None = None,
        release: bool = True,
        grace_seconds: float | None = None,
        source: str = "user",
    ) -> dict[str, Any]:
        """Pause sharing now: state "draining" then "paused"; returns at once (the drain runs in a thread).

        `reason` is a short code ("user", "cpu_busy", "fullscreen", ...), `message` says it to a person,
        `until` (epoch seconds) is when a user's pause ends by itself (None: when its cause clears).
        `release` frees the weights (long pauses, games that need the memory); otherwise they stay loaded.
        A pause of the same source while paused only updates the reason and end time.
        """
        source = PauseSource(source)
        grace = self.core.config.grace_seconds if grace_seconds is None else grace_seconds
        mode = PauseMode.RELEASE if release else PauseMode.HOLD
        pause = Pause(
            reason=reason, message=message, since=time.time(), until=until, mode=mode, source=source
        )
        with self.core.lock:
            state, host, current = self.core.status_record.state, self._host, self.core.status_record.pause
            if state == HostingState.PAUSED and current is not None:
                if current.source == PauseSource.USER and source == PauseSource.POLICY:
                    return self.core.status_record.to_dict()  # the user's own pause wins until it ends
                keep = current.mode == PauseMode.RELEASE or not release
                pause = pause.replace(since=current.since, mode=current.mode if keep else PauseMode.RELEASE)
                self.core.status_record = self.core.status_record.replace(pause=pause)
                needs_release = not keep and host is not None
            elif state == HostingState.SERVING and host is not None:
                needs_release = None  # a fresh drain
                self._end_sharing_stretch()
                # Marked at once: a move that would start now sees "draining" and stays put.
                self.core.status_record = self.core.status_record.replace(state=HostingState.DRAINING)
            elif self.core.status_record.move is not None:
                move = self.core.status_record.move
                raise WrongStateError(
                    f"Sharing is moving to blocks {move.to_blocks[0]}:{move.to_blocks[1]}; "
                    "pause again once it serves."
                )
            else:
                raise WrongStateError(
                    f"Sharing is {state}; only a block server that is serving can pause."
                    + (" Wait until it has loaded." if state == HostingState.LOADING else "")
                )
        if needs_release is None:
            status = self.core.set_status(
                state=HostingState.DRAINING,
                progress=None,
                phase=None,
                message=f"Pausing: {message}",
                pause=pause,
            )
            self.core.spawn(lambda: self._pause_drain(host, grace, release), "pollinate-pausing")
            return status
        status = self.core.status()
        self.core.emit("status", status)
        if needs_release:
            self.core.spawn(self.release_paused, "pollinate-pause-release")
        return status

    def _pause_drain(self, host, grace: float, release: bool) -> None:
        from engine.server.drain import DrainMode

        self._stop_auditor()
        try:
            report = host.drain(grace, DrainMode.RELEASE if release else DrainMode.HOLD)
            logger.info("paused: %s", report)
        except Exception:
            logger.warning("error while draining the block host for a pause", exc_info=True)
            release = True
            host.stop()
        if release:
            self._forget_host(host)
        self.core.set_status(state=HostingState.PAUSED, message=None)

    def _forget_host(self, host) -> None:
        from engine.service.hosting import _release_memory

        self._account_host(host)
        with self.core.lock:
            if self._host is host:
                self._host = None
            server, self._server = self._server, None
        del host
        if server is not None:  # its host is stopped already: this ends the DHT peer and the rebalancing
            server.stop()
        _release_memory()

    def release_paused(self) -> None:
        """Free the weights of a host paused in HOLD mode (a short pause that turned long); blocks."""
        with self.core.lock:
            host, pause = self._host, self.core.status_record.pause
            if self.core.status_record.state != HostingState.PAUSED or host is None:
                return
            if pause is not None:
                self.core.status_record = self.core.status_record.replace(
                    pause=pause.replace(mode=PauseMode.RELEASE)
                )
        try:
            host.stop()
        except Exception:
            logger.warning("error while releasing a paused block host", exc_info=True)
        self._forget_host(host)
        self.core.emit("status", self.core.status())

    def resume_sharing(self, source: str = "user") -> dict[str, Any]:
        """End a pause: a held host serves again at once, a released one loads again (state "loading").

        The monitor (source "policy") cannot end a pause the user chose.
        """
        source = PauseSource(source)
        with self.core.lock:
            state, host, pause = self.core.status_record.state, self._host, self.core.status_record.pause
            if state != HostingState.PAUSED or pause is None:
                raise WrongStateError(f"Sharing is {state}, not paused; there is nothing to resume.")
            if pause.source == PauseSource.USER and source == PauseSource.POLICY:
                raise WrongStateError("The user paused sharing; only the user (or the end time) resumes it.")
            request = dict(getattr(self, "_hosting_request", None) or {})
        if host is not None:
            try:
                host.resume()
            except Exception as exc:
                logger.warning("a paused block host could not resume: %s", exc)
                host.stop()
                self._forget_host(host)
                host = None
            else:
                with self.core.lock:
                    self._hosting_since = time.time()
                self._start_auditor(host)
                status = self.core.set_status(state=HostingState.SERVING, message=None, pause=None)
                self._apply_pending_share()  # the memory share changed while paused
                self._rebalance_soon()  # the swarm may have changed while paused: look again now
                return status
        self.core.set_status(pause=None)
        try:
            return self._start_host(**request, from_states=(HostingState.PAUSED,))
        except Exception as exc:
            self.core.set_status(
                state=HostingState.ERROR, message=f"Sharing could not resume: {exc}", blocks=None
            )
            raise
