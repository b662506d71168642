"""Where an inference session's step time went on this server, for the debug log (`serve -v`).

Each step notes four instants: its request arrived from the stream, its compute started and ended (queue
wait and thread hand-off before, compute after), its reply was handed to the stream. The gap between a
reply and the next request is time outside this server (the wire, the other servers, the client).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """Per-step spans of one session, in seconds (lists of equal length once a step is complete)."""

    decode: list[float] = field(default_factory=list)  # arrival -> compute start: parse, queue, hand-off
    compute: list[float] = field(default_factory=list)  # the blocks, as the compute thread timed them
    reply: list[float] = field(default_factory=list)  # compute end -> reply handed to the stream
    outside: list[float] = field(default_factory=list)  # previous reply -> this step's arrival
    inline: int = 0  # steps run on the event loop thread (the compute loop was idle)
    _last_reply: float | None = None

    def step(self, arrived: float, computed: float, seconds: float, inline: bool) -> None:
        """Record a step that arrived at `arrived`, computed for `seconds` and ended at `computed`."""
        self.decode.append(max(computed - seconds - arrived, 0.0))
        self.compute.append(seconds)
        if self._last_reply is not None:
            self.outside.append(max(arrived - self._last_reply, 0.0))
        self.inline += bool(inline)

    def replied(self, computed: float, now: float | None = None) -> None:
        """The step that computed until `computed` has its reply on the stream now."""
        now = time.perf_counter() if now is None else now
        self.reply.append(max(now - computed, 0.0))
        self._last_reply = now

    def summary(self) -> str:
        """Medians in milliseconds, e.g. "12 steps (12 inline): decode 0.31, compute 11.80, ..."."""

        def median_ms(values: list[float]) -> str:
            return f"{statistics.median(values) * 1e3:.2f}" if values else "-"

        return (
            f"{len(self.compute)} steps ({self.inline} inline), median ms: decode {median_ms(self.decode)}, "
            f"compute {median_ms(self.compute)}, reply {median_ms(self.reply)}, "
            f"outside {median_ms(self.outside)}"
        )
