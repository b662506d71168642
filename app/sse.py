"""Incremental Server-Sent Events parser: feed it bytes as they arrive, get whole events back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event; `event` is "message" when the stream named none."""

    event: str
    data: str
    id: str | None = None


class SseParser:
    """Parses the text/event-stream format (WHATWG) from chunks split at arbitrary byte positions."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events completed by them (comments and keep-alives yield nothing)."""
        self._buffer += chunk
        events: list[SseEvent] = []
        while True:
            line, sep, rest = self._split_line(self._buffer)
            if not sep:
                break
            self._buffer = rest
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    @staticmethod
    def _split_line(buffer: bytes) -> tuple[bytes, bytes, bytes]:
        for index, byte in enumerate(buffer):
            if byte == 0x0A:
                return buffer[:index], b"\n", buffer[index + 1 :]
            if byte == 0x0D:
                if index + 1 == len(buffer):
                    return b"", b"", buffer  # wait: a "\n" may follow
                skip = 2 if buffer[index + 1] == 0x0A else 1
                return buffer[:index], b"\r", buffer[index + skip :]
        return b"", b"", buffer

    def _line(self, line: str) -> SseEvent | None:
        if line == "":
            if not self._data and not self._event:
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None
