"""ApiClient, EventFeed and the SSE parser against the fake engine."""

from __future__ import annotations

import json

from app.api_client import ApiClient, ApiError, EngineEndpoint, EventFeed, describe_error, parse_error
from app.sse import SseParser


def test_sse_parser_handles_split_chunks_comments_and_crlf():
    parser = SseParser()
    stream = b': hello\r\n\r\nevent: status\r\ndata: {"a":\r\n\r\ndata: line1\ndata: line2\n\n'
    events = []
    for i in range(len(stream)):
        events += parser.feed(stream[i : i + 1])
    assert [(e.event, e.data) for e in events] == [("status", '{"a":'), ("message", "line1\nline2")]


def test_parse_error_and_describe():
    body = json.dumps(
        {
            "error": {
                "message": "blocks 2, 3 have no server",
                "type": "swarm_unavailable",
                "code": 503,
                "missing_blocks": [2, 3],
            }
        }
    ).encode()
    error = parse_error(503, body)
    assert error == ApiError(503, "swarm_unavailable", "blocks 2, 3 have no server", (2, 3))
    assert "block(s) 2, 3" in describe_error(error, "get a reply")
    assert "not running" in describe_error(parse_error(0, b"", "Connection refused"))
    assert parse_error(500, b"oops").message == "oops"


def test_get_post_and_errors(qtbot, api_client, fake_engine):
    with qtbot.waitSignal(api_client.get("/api/hardware").succeeded) as blocker:
        pass
    assert blocker.args[0]["gpus"][0]["name"].startswith("NVIDIA")
    with qtbot.waitSignal(api_client.post("/api/hosting/stop", {}).failed) as blocker:
        pass
    assert blocker.args[0].status == 409 and blocker.args[0].type == "wrong_state"
    api_client.set_endpoint(EngineEndpoint(fake_engine.base_url, "wrong"))
    with qtbot.waitSignal(api_client.get("/api/status").failed) as blocker:
        pass
    assert blocker.args[0].status == 401


def test_no_endpoint_and_unreachable_fail_as_engine_down(qtbot, qapp):
    client = ApiClient()
    with qtbot.waitSignal(client.get("/api/status").failed) as blocker:
        pass
    assert blocker.args[0].unreachable
    client.set_endpoint(EngineEndpoint("http://127.0.0.1:9", None))
    with qtbot.waitSignal(client.get("/api/status").failed, timeout=5000) as blocker:
        pass
    assert blocker.args[0].unreachable


def test_event_feed_delivers_status_and_stats(qtbot, api_client, fake_engine):
    feed = EventFeed(api_client)
    statuses, stats = [], []
    feed.status.connect(statuses.append)
    feed.stats.connect(stats.append)
    with qtbot.waitSignal(feed.connected_changed):
        feed.start()
    fake_engine.add_stats(tokens=5, requests=1)
    fake_engine.set_status(state="loading", progress=0.5)
    qtbot.waitUntil(lambda: any(s.get("state") == "loading" for s in statuses))
    qtbot.waitUntil(lambda: any(s["tokens_served"] == 5 for s in stats))
    feed.stop()


def test_every_request_times_out_and_says_so(qtbot, api_client, fake_engine):
    """A wedged engine (answers nothing on some paths) must not leave the app waiting without a word."""
    fake_engine.stalled = {"/api/swarm", "/api/hosting/start", "/v1/chat/completions"}
    api_client.request_timeout_ms = api_client.post_timeout_ms = api_client.chat_idle_timeout_ms = 400
    calls = [
        api_client.get("/api/swarm"),
        api_client.post("/api/hosting/start"),
        api_client.stream("/v1/chat/completions", {"model": "x", "messages": []}),
    ]
    errors: list = []
    for call in calls:
        call.failed.connect(errors.append)
    qtbot.waitUntil(lambda: len(errors) == len(calls), timeout=5000)
    for error in errors:
        assert error.timed_out and not error.unreachable, error
        text = describe_error(error, "show the swarm")
        assert "did not answer within 0.4 s" in text and "not running" not in text
    fake_engine.closing.set()  # let the stalled handlers end
