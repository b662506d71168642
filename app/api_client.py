"""Asynchronous client of the engine's local HTTP API (QNetworkAccessManager); results arrive as signals.

Two kinds of failure stay apart: `ApiError.status == 0` means the engine could not be reached (it is down or
restarting); any other status is "this request failed" with the engine's own message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from app.qt import (
    QByteArray,
    QNetworkAccessManager,
    QNetworkReply,
    QNetworkRequest,
    QObject,
    QTimer,
    QUrl,
    Signal,
)
from app.sse import SseEvent, SseParser
from contract import Stats, Status

log = logging.getLogger(__name__)

# Every request has a timeout, and a request that runs out says so (ApiError type "timeout"): an engine that
# answers /api/status but not the swarm must never leave the app waiting without a word.
REQUEST_TIMEOUT_MS = 15_000
# Control calls (start hosting) plan the span first, which reads the swarm.
POST_TIMEOUT_MS = 45_000
# Streams time out when nothing arrives for this long: events carry a keep-alive every 15 s; a chat reply
# may wait for a slow swarm's first token.
EVENTS_IDLE_TIMEOUT_MS = 45_000
CHAT_IDLE_TIMEOUT_MS = 120_000


@dataclass(frozen=True)
class EngineEndpoint:
    """Where the engine listens and the bearer token it wants."""

    base_url: str
    token: str | None


@dataclass(frozen=True)
class ApiError:
    """A failed call: status 0 when the engine was unreachable, else the engine's HTTP error."""

    status: int
    type: str
    message: str
    missing_blocks: tuple[int, ...] = ()

    @property
    def unreachable(self) -> bool:
        """The engine could not be reached (down or restarting); a timeout is not that."""
        return self.status == 0 and self.type != "timeout"

    @property
    def timed_out(self) -> bool:
        return self.type == "timeout"


ENGINE_DOWN = ApiError(0, "engine_unavailable", "The engine is not running.")


def timeout_error(timeout_ms: int) -> ApiError:
    return ApiError(0, "timeout", f"the engine did not answer within {timeout_ms / 1000:g} s")


def parse_error(status: int, body: bytes, network_error: str = "") -> ApiError:
    """Build an ApiError from an HTTP status and body (OpenAI-style JSON error, or anything else)."""
    if status == 0:
        return ApiError(0, "engine_unavailable", network_error or "The engine could not be reached.")
    try:
        payload = json.loads(body.decode("utf-8") or "{}")
    except ValueError:
        payload = {}
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        detail = payload.get("detail") if isinstance(payload, dict) else None
        text = detail if isinstance(detail, str) else body.decode("utf-8", errors="replace")[:300]
        return ApiError(status, "http_error", text or f"HTTP {status}")
    missing = error.get("missing_blocks") or ()
    return ApiError(
        status,
        str(error.get("type") or "error"),
        str(error.get("message") or f"HTTP {status}"),
        tuple(int(b) for b in missing if isinstance(b, int)),
    )


def describe_error(error: ApiError, doing: str = "") -> str:
    """One sentence for a person: what failed and what to do (the app's single wording of errors)."""
    prefix = f"Could not {doing}: " if doing else ""
    if error.timed_out:
        return (
            f"{prefix}{error.message} (it may be busy, or stuck). Try again; if this keeps happening, "
            "restart Pollinate."
        )
    if error.unreachable:
        return f"{prefix}the engine is not running (it may be restarting). Try again in a moment."
    if error.type == "swarm_unavailable":
        if error.missing_blocks:
            blocks = ", ".join(str(b) for b in error.missing_blocks[:12])
            more = "…" if len(error.missing_blocks) > 12 else ""
            return (
                f"{prefix}the swarm cannot serve this model now: no server holds block(s) {blocks}{more}. "
                "Share your GPU to host them, or pick another model."
            )
        return f"{prefix}{error.message}"
    if error.status == 401:
        return f"{prefix}the engine refused the app's token. Restart Pollinate."
    return f"{prefix}{error.message}"


class ApiCall(QObject):
    """One request in flight; emits exactly one of `succeeded(object)` (parsed JSON) or `failed(ApiError)`."""

    succeeded = Signal(object)
    failed = Signal(object)

    def __init__(self, reply: QNetworkReply | None, pending: set, resend=None, timeout_ms: int = 0):
        # No Qt parent: the client's `pending` set keeps it alive until done, then Python frees it.
        super().__init__()
        self.reply = reply
        self.timeout_ms = timeout_ms
        self._pending = pending
        self._error: ApiError | None = None
        self._resend = resend  # sends the request again on a fresh connection (once)
        pending.add(self)
        if reply is not None:
            reply.finished.connect(self._finished)

    def _finished(self) -> None:
        reply = self.reply
        assert reply is not None
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute) or 0
        body = bytes(reply.readAll().data())
        reply.deleteLater()
        closed = reply.error() == QNetworkReply.NetworkError.RemoteHostClosedError
        if closed and not status and self._resend is not None:
            # The server closed an idle keep-alive connection just as Qt reused it for this POST.
            self.reply, self._resend = self._resend(), None
            self.reply.finished.connect(self._finished)
            return
        if reply.error() == QNetworkReply.NetworkError.TimeoutError:
            log.warning("%s timed out after %d ms", reply.url().path(), self.timeout_ms)
            self.failed.emit(timeout_error(self.timeout_ms))
        elif reply.error() != QNetworkReply.NetworkError.NoError and not status:
            log.warning("%s failed: %s", reply.url().path(), reply.errorString())
            self.failed.emit(parse_error(0, b"", reply.errorString()))
        elif status >= 400:
            self.failed.emit(parse_error(status, body))
        else:
            try:
                self.succeeded.emit(json.loads(body.decode("utf-8")) if body else {})
            except ValueError:
                self.failed.emit(
                    ApiError(status, "bad_response", "The engine sent a reply that is not JSON.")
                )
        self.deleteLater()

    def fail_later(self, error: ApiError) -> ApiCall:
        QTimer.singleShot(0, lambda: (self.failed.emit(error), self.deleteLater()))
        return self


class ApiStream(QObject):
    """An SSE response read incrementally: `event(SseEvent)`, then `finished()` or `failed(ApiError)`.

    `abort()` closes the connection (the engine cancels generation); after it no signal fires.
    """

    opened = Signal()
    event = Signal(object)
    finished = Signal()
    failed = Signal(object)

    def __init__(self, reply: QNetworkReply | None, pending: set, timeout_ms: int = 0):
        super().__init__()
        self.reply = reply
        self.timeout_ms = timeout_ms  # of silence
        self._pending = pending
        self._error: ApiError | None = None
        pending.add(self)
        self.aborted = False
        self._parser = SseParser()
        self._error_body = b""
        if reply is not None:
            reply.metaDataChanged.connect(self._headers)
            reply.readyRead.connect(self._ready_read)
            reply.finished.connect(self._finished)

    def _status(self) -> int:
        assert self.reply is not None
        return self.reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute) or 0

    def _headers(self) -> None:
        if 0 < self._status() < 400 and not self.aborted:
            self.opened.emit()

    def _ready_read(self) -> None:
        assert self.reply is not None
        data = bytes(self.reply.readAll().data())
        if self._status() >= 400:
            self._error_body += data
            return
        for event in self._parser.feed(data):
            if self.aborted:
                return
            self.event.emit(event)

    def _finished(self) -> None:
        reply = self.reply
        assert reply is not None
        if not self.aborted:
            self._ready_read()
            status = self._status()
            if status >= 400:
                self.failed.emit(parse_error(status, self._error_body))
            elif reply.error() == QNetworkReply.NetworkError.TimeoutError:
                self.failed.emit(timeout_error(self.timeout_ms))
            elif reply.error() != QNetworkReply.NetworkError.NoError:
                self.failed.emit(parse_error(0, b"", reply.errorString()))
            else:
                self.finished.emit()
        reply.deleteLater()
        self._pending.discard(self)

    def abort(self) -> None:
        if self.aborted or self.reply is None:
            return
        self.aborted = True
        self.reply.abort()

    def fail_later(self, error: ApiError) -> ApiStream:
        self._error = error
        QTimer.singleShot(0, self._fail_now)
        return self

    def _fail_now(self) -> None:
        self.failed.emit(self._error)
        self._pending.discard(self)


class ApiClient(QObject):
    """Issues calls to the engine at the current endpoint; without one, calls fail with ENGINE_DOWN."""

    endpoint_changed = Signal(object)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._network = QNetworkAccessManager(self)
        self._pending: set[QObject] = set()  # calls in flight, kept alive until they finish
        self.endpoint: EngineEndpoint | None = None
        self.request_timeout_ms = REQUEST_TIMEOUT_MS
        self.post_timeout_ms = POST_TIMEOUT_MS
        self.chat_idle_timeout_ms = CHAT_IDLE_TIMEOUT_MS
        self.events_idle_timeout_ms = EVENTS_IDLE_TIMEOUT_MS

    def set_endpoint(self, endpoint: EngineEndpoint | None) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            self.endpoint_changed.emit(endpoint)

    def _request(self, path: str, *, timeout_ms: int, stream: bool = False) -> QNetworkRequest:
        assert self.endpoint is not None
        request = QNetworkRequest(QUrl(self.endpoint.base_url.rstrip("/") + path))
        if self.endpoint.token:
            request.setRawHeader(b"Authorization", f"Bearer {self.endpoint.token}".encode())
        request.setHeader(QNetworkRequest.KnownHeaders.ContentTypeHeader, "application/json")
        if stream:
            request.setRawHeader(b"Accept", b"text/event-stream")
            request.setAttribute(
                QNetworkRequest.Attribute.CacheLoadControlAttribute,
                QNetworkRequest.CacheLoadControl.AlwaysNetwork,
            )
        request.setTransferTimeout(timeout_ms)  # for a stream: the longest silence
        return request

    def get(self, path: str) -> ApiCall:
        if self.endpoint is None:
            return ApiCall(None, self._pending).fail_later(ENGINE_DOWN)
        timeout = self.request_timeout_ms
        return ApiCall(
            self._network.get(self._request(path, timeout_ms=timeout)), self._pending, None, timeout
        )

    def post(self, path: str, body: dict | None = None) -> ApiCall:
        if self.endpoint is None:
            return ApiCall(None, self._pending).fail_later(ENGINE_DOWN)
        payload = QByteArray(json.dumps(body or {}).encode())
        request = self._request(path, timeout_ms=self.post_timeout_ms)

        def resend() -> QNetworkReply:
            return self._network.post(request, payload)

        return ApiCall(self._network.post(request, payload), self._pending, resend, self.post_timeout_ms)

    def put(self, path: str, body: dict) -> ApiCall:
        """PUT a JSON body (replaces a resource, e.g. /api/policy)."""
        if self.endpoint is None:
            return ApiCall(None, self._pending).fail_later(ENGINE_DOWN)
        payload = QByteArray(json.dumps(body).encode())
        request = self._request(path, timeout_ms=self.post_timeout_ms)
        return ApiCall(self._network.put(request, payload), self._pending, None, self.post_timeout_ms)

    def stream(self, path: str, body: dict | None = None, idle_timeout_ms: int | None = None) -> ApiStream:
        """GET (body None) or POST an SSE endpoint; fails with a timeout after idle_timeout_ms of silence."""
        if self.endpoint is None:
            return ApiStream(None, self._pending).fail_later(ENGINE_DOWN)
        idle_timeout_ms = idle_timeout_ms or self.chat_idle_timeout_ms
        request = self._request(path, stream=True, timeout_ms=idle_timeout_ms)
        if body is None:
            reply = self._network.get(request)
        else:
            reply = self._network.post(request, QByteArray(json.dumps(body).encode()))
        return ApiStream(reply, self._pending, idle_timeout_ms)


class EventFeed(QObject):
    """Follows /api/events: emits `status(dict)`, `stats(dict)`; reconnects with backoff while connected.

    On each (re)connection it also fetches /api/status and /api/stats, so views start from a full picture.
    Both are read through the contract's records: every field is present (an older engine's missing ones
    take their defaults), so views never guess.
    """

    status = Signal(object)
    stats = Signal(object)
    connected_changed = Signal(bool)

    BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0)

    def __init__(self, client: ApiClient, parent: QObject | None = None):
        super().__init__(parent)
        self.client = client
        self.connected = False
        self._stream: ApiStream | None = None
        self._failures = 0
        self._retry = QTimer(self)
        self._retry.setSingleShot(True)
        self._retry.timeout.connect(self._open)
        client.endpoint_changed.connect(self._endpoint_changed)

    def _endpoint_changed(self, endpoint: EngineEndpoint | None) -> None:
        self._close()
        self._failures = 0
        if endpoint is not None:
            self._open()

    def start(self) -> None:
        if self.client.endpoint is not None and self._stream is None:
            self._open()

    def stop(self) -> None:
        self._retry.stop()
        self._close()

    def _close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()
        self._set_connected(False)

    def _open(self) -> None:
        if self.client.endpoint is None:
            return
        stream = self.client.stream("/api/events", idle_timeout_ms=self.client.events_idle_timeout_ms)
        self._stream = stream
        stream.opened.connect(self._opened)
        stream.event.connect(self._event)
        stream.finished.connect(lambda: self._lost(stream))
        stream.failed.connect(lambda _error: self._lost(stream))
        self.client.get("/api/status").succeeded.connect(self._status_reply)
        self.client.get("/api/stats").succeeded.connect(self._stats_reply)

    # Bound methods (not signal.emit) so a deleted feed is disconnected, never called.
    def _status_reply(self, data: dict) -> None:
        self.status.emit(Status.from_dict(data).to_dict())

    def _stats_reply(self, data: dict) -> None:
        self.stats.emit(Stats.from_dict(data).to_dict())

    def _opened(self) -> None:
        self._failures = 0
        self._set_connected(True)

    def _event(self, event: SseEvent) -> None:
        try:
            data = json.loads(event.data)
        except ValueError:
            log.warning("event %s with non-JSON data", event.event)
            return
        if event.event == "status":
            self._status_reply(data)
        elif event.event == "stats":
            self._stats_reply(data)

    def _lost(self, stream: ApiStream) -> None:
        if stream is not self._stream:
            return
        self._stream = None
        self._set_connected(False)
        delay = self.BACKOFF_S[min(self._failures, len(self.BACKOFF_S) - 1)]
        self._failures += 1
        self._retry.start(int(delay * 1000))

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.connected_changed.emit(connected)
