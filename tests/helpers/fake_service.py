"""FakeEngineService: the EngineService interface with canned answers, no torch and no swarm.

For API tests, and for developing the app against a running API without a swarm:
`python -m tests.helpers.fake_service --port 8765` prints the port and token.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from contract import (
    DEFAULT_CONTEXT_TOKENS,
    HostingPlan,
    HostingState,
    LoadPhase,
    ModelFacts,
    Pause,
    PauseMode,
    Stats,
    Status,
    hosting_progress,
)
from engine.service import (
    Finished,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    Started,
    SwarmUnavailableError,
    TextDelta,
    WrongStateError,
)

FAKE_MODELS = {"fake-model": (4, []), "fake-broken": (4, [2, 3])}
FAKE_REPLY = "Hello from the fake engine , this is a canned reply ."
CONTEXT_TOKENS = DEFAULT_CONTEXT_TOKENS


class FakeEngineService:
    """Behaves like EngineService at its API surface; generation returns FAKE_REPLY word by word."""

    def __init__(self, data_dir: Path | None = None, *, token_delay: float = 0.0, hosting_delay: float = 0.0):
        self.version = "0.1.0"
        self.pid = os.getpid()
        self.data_dir = Path(data_dir or ".")
        self.token_delay = token_delay
        self.hosting_delay = hosting_delay
        self.default_model = "fake-model"
        self.started_at = time.time()
        self.sessions_open = 0
        self.sessions_closed = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str, Any], None]] = []
        self._status = Status(ready=True)
        self._policy: dict[str, Any] | None = None
        self._tokens = 0
        self._requests = 0

    # ---- events --------------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    def _set_status(self, **changes) -> dict[str, Any]:
        with self._lock:
            self._status = self._status.replace(**changes)
            status = self._status.to_dict()
        for listener in self._listeners:
            listener("status", status)
        return status

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self._status.to_dict()

    def stats(self) -> dict[str, Any]:
        return Stats(
            tokens_served=0,
            requests_served=0,
            uptime_seconds=time.time() - self.started_at,
            hosting_seconds=0.0,
            sessions_active=self.sessions_open - self.sessions_closed,
            points=0.0,
            priority=1.0,
            tokens_generated=self._tokens,
            requests_generated=self._requests,
        ).to_dict()

    # ---- models and swarm ------------------------------------------------------------------------------

    def _model(self, name: str | None) -> tuple[str, int, list[int]]:
        name = name or self.default_model
        if name not in FAKE_MODELS:
            raise ModelNotFoundError(
                f"Unknown model {name!r}; GET /v1/models lists the models the swarm serves."
            )
        return (name, *FAKE_MODELS[name])

    def list_models(self) -> list[dict[str, Any]]:
        return [
            dict(
                id=name,
                pollinate=ModelFacts(
                    label=name, num_blocks=n, missing_blocks=missing, context_length=CONTEXT_TOKENS
                ).to_dict(),
            )
            for name, (n, missing) in FAKE_MODELS.items()
        ]

    def swarm_info(self, model: str | None) -> dict[str, Any]:
        name, total, missing = self._model(model)
        covered = [i for i in range(total) if i not in missing]
        return dict(
            model=name,
            dht_prefix=name + "-hf",
            total_blocks=total,
            blocks=[
                dict(index=i, servers=int(i in covered), throughput=float(i in covered)) for i in range(total)
            ],
            servers=[
                dict(
                    peer_id="QmFake",
                    public_name=None,
                    start_block=0,
                    end_block=covered[-1] + 1 if covered else 0,
                    state="online",
                    throughput=1.0,
                    version="0.1.0",
                )
            ]
            if covered
            else [],
            missing_blocks=missing,
        )

    def hosting_plan(self, model: str | None, quant=None, memory_fraction=None) -> dict[str, Any]:
        name, total, _ = self._model(model)
        return HostingPlan(
            model=name,
            dht_prefix=name + "-hf",
            start_block=0,
            end_block=total,
            num_blocks=total,
            total_blocks=total,
            quant="none" if quant in (None, "auto") else str(quant),
            dtype="float32",
            device="cpu",
            memory_kind="ram",
            budget_bytes=int(10_000 * (memory_fraction or 1.0)),
            weights_bytes=1000,
            cache_bytes=100,
            total_bytes=1100,
        ).to_dict()

    # ---- hosting ---------------------------------------------------------------------------------------

    def start_hosting(self, model=None, blocks=None, quant=None, memory_fraction=None) -> dict[str, Any]:
        name, total, _ = self._model(model)
        with self._lock:
            if self._status.state not in (HostingState.IDLE, HostingState.ERROR):
                raise WrongStateError(f"Hosting is {self._status.state}; stop it first.")
            self._status = self._status.replace(state=HostingState.LOADING)
        if blocks in (None, "auto"):
            span = [0, total]
        elif ":" not in blocks:  # a count of blocks
            span = [0, int(blocks)]
        else:
            span = [int(x) for x in blocks.split(":")]
        if span[1] > total:
            self._set_status(state=HostingState.IDLE)
            raise InvalidRequestError(f"{name} has {total} blocks; {blocks} is out of range.")
        status = self._set_status(
            state=HostingState.LOADING,
            progress=hosting_progress(LoadPhase.LOADING_BLOCKS),
            phase=LoadPhase.LOADING_BLOCKS,
            message=LoadPhase.LOADING_BLOCKS.words,
            model=name,
            blocks=span,
        )

        def finish():
            time.sleep(self.hosting_delay)
            self._set_status(state=HostingState.SERVING, progress=None, phase=None, message=None)

        threading.Thread(target=finish, daemon=True).start()
        return status

    def stop_hosting(self, grace_seconds: float | None = None) -> dict[str, Any]:
        with self._lock:
            if self._status.state in (HostingState.IDLE, HostingState.ERROR, HostingState.DRAINING):
                raise WrongStateError(f"Hosting is {self._status.state}; there is nothing to stop.")
            self._status = self._status.replace(state=HostingState.DRAINING)
        status = self._set_status(state=HostingState.DRAINING, message="Letting sessions finish")

        def finish():
            time.sleep(self.hosting_delay)
            self._set_status(
                state=HostingState.IDLE, progress=None, phase=None, message=None, model=None, blocks=None
            )

        threading.Thread(target=finish, daemon=True).start()
        return status

    def set_memory_share(self, memory_fraction: float) -> dict[str, Any]:
        with self._lock:
            if self._status.state in (HostingState.IDLE, HostingState.ERROR):
                raise WrongStateError(f"Sharing is {self._status.state}: the share applies when it starts.")
            self.memory_fraction = memory_fraction
            return self._status.to_dict()

    def pause_for(self, seconds=None, until=None, release=True, grace_seconds=None) -> dict[str, Any]:
        if seconds is not None and until is not None:
            raise InvalidRequestError("give either seconds or until, not both")
        with self._lock:
            if self._status.state != HostingState.SERVING:
                raise WrongStateError(f"Sharing is {self._status.state}; only serving can pause.")
        until = time.time() + seconds if seconds is not None else until
        mode = PauseMode.RELEASE if release else PauseMode.HOLD
        pause = Pause(message="Paused by you", since=time.time(), until=until, mode=mode)
        return self._set_status(state=HostingState.PAUSED, pause=pause)

    def resume_sharing(self, source: str = "user") -> dict[str, Any]:
        with self._lock:
            if self._status.state != HostingState.PAUSED:
                raise WrongStateError(f"Sharing is {self._status.state}, not paused.")
        return self._set_status(state=HostingState.SERVING, pause=None)

    def policy(self) -> dict[str, Any]:
        from engine.polite.settings import PolicySettings

        settings = self._policy or PolicySettings().to_dict()
        return dict(settings=settings, detectors={}, decision=dict(pause=False))

    def set_policy(self, data: dict[str, Any]) -> dict[str, Any]:
        from engine.polite.settings import PolicyError, PolicySettings

        try:
            self._policy = PolicySettings.from_dict(data).to_dict()
        except PolicyError as exc:
            raise InvalidRequestError(str(exc)) from None
        return self.policy()

    # ---- generation ------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Any]:
        name, _, missing = self._model(request.model)
        if missing:
            shown = ", ".join(map(str, missing))
            raise SwarmUnavailableError(
                f"The swarm cannot serve {name}: blocks {shown} have no server.", missing
            )
        # A word is a token here; fitting drops the oldest non-system turns, like the engine.
        messages, dropped = list(request.messages or ()), 0
        if request.fit_context:
            while sum(len(c.split()) for _, c in messages) + 1 > CONTEXT_TOKENS // 2 and len(messages) > 1:
                index = next(i for i, (role, _) in enumerate(messages) if role != "system")
                if index == len(messages) - 1:
                    break
                messages.pop(index)
                dropped += 1
        prompt = request.prompt if request.prompt is not None else " ".join(c for _, c in messages)
        prompt_tokens = len(prompt.split()) + 1
        max_tokens = request.max_tokens
        if request.fit_context and max_tokens is not None:
            max_tokens = min(max_tokens, CONTEXT_TOKENS - prompt_tokens)
        if max_tokens is not None and prompt_tokens + max_tokens > CONTEXT_TOKENS:
            raise InvalidRequestError(
                f"The prompt ({prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                f"the model's context of {CONTEXT_TOKENS} tokens."
            )
        self.sessions_open += 1
        produced, text, reason = 0, "", "stop"
        try:
            yield Started(
                prompt_tokens, CONTEXT_TOKENS, max_tokens or CONTEXT_TOKENS - prompt_tokens, dropped
            )
            for word in FAKE_REPLY.split():
                if max_tokens is not None and produced >= max_tokens:
                    reason = "length"
                    break
                if cancel.is_set():
                    return
                time.sleep(self.token_delay)
                piece = (" " if produced else "") + word
                candidate = text + piece
                hit = min((i for i in (candidate.find(s) for s in request.stop) if i >= 0), default=None)
                produced += 1
                if hit is not None:
                    if candidate[len(text) : hit]:
                        yield TextDelta(candidate[len(text) : hit])
                    break
                text = candidate
                yield TextDelta(piece)
            self._tokens += produced
            self._requests += 1
            yield Finished(reason, prompt_tokens, produced)
        finally:
            self.sessions_closed += 1


def main() -> None:  # pragma: no cover - a developer convenience
    import argparse
    import tempfile

    import uvicorn

    from engine.api.app import create_app

    parser = argparse.ArgumentParser(description="Serve the engine API over a fake service (no swarm).")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default="fake-token")
    args = parser.parse_args()
    service = FakeEngineService(Path(tempfile.gettempdir()), token_delay=0.05, hosting_delay=2.0)
    print(f"fake engine on http://127.0.0.1:{args.port} token={args.token}", flush=True)
    uvicorn.run(create_app(service, args.token), host="127.0.0.1", port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
