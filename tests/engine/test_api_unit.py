"""The HTTP layer over a fake service: security, errors, OpenAI shapes, hosting states, SSE, token storage."""

from __future__ import annotations

import json
import os
import stat
import time

import httpx
import pytest

from engine.api.app import create_app
from engine.api.auth import KEYRING_SERVICE, KEYRING_USER, host_is_loopback, load_or_create_token
from engine.api.events import sse_event
from engine.api.server import ApiServer
from tests.helpers.fake_service import FAKE_REPLY, FakeEngineService

TOKEN = "test-token-123"


@pytest.fixture
def fake(tmp_path):
    return FakeEngineService(tmp_path, hosting_delay=0.3)


@pytest.fixture
def api(fake):
    """A live server over the fake service; yields an httpx client that sends the token."""
    with ApiServer(create_app(fake, TOKEN, keepalive_seconds=0.5)) as server:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as client:
            client.server = server
            yield client


def _error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["type"] == kind and body["error"]["code"] == status
    assert body["error"]["message"]
    return body["error"]


# ---- security --------------------------------------------------------------------------------------------


def test_health_needs_no_token(api):
    response = httpx.get(api.server.base_url + "/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["pid"] == os.getpid()


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"])
def test_missing_or_wrong_token_is_401(api, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in [("GET", "/api/status"), ("POST", "/v1/chat/completions"), ("GET", "/openapi.json")]:
        response = httpx.request(method, api.server.base_url + path, headers=headers, content=b"{not json")
        _error(response, 401, "unauthorized")


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil:80", "10.0.0.1"])
def test_foreign_host_is_403(api, host):
    for path in ("/api/health", "/api/status"):
        response = api.get(path, headers={"Host": host})
        _error(response, 403, "forbidden_host")


def test_host_header_rules():
    good = ["127.0.0.1", "127.0.0.1:8765", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8080"]
    bad = ["", None, "example.com", "127.0.0.2", "localhost:", "localhost:ab", "[::1]x", "[::2]:80", "::1"]
    assert all(host_is_loopback(h) for h in good)
    assert not any(host_is_loopback(h) for h in bad)


# ---- errors ----------------------------------------------------------------------------------------------


def test_malformed_json_is_400(api):
    response = api.post(
        "/v1/chat/completions",
        content=b'{"model": "fake-model", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert "JSON" in _error(response, 400, "invalid_request")["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fake-model"},
        {"model": "fake-model", "messages": []},
        {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
        {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "n": 2},
        {"model": "fake-model", "messages": [{"role": "wizard", "content": "hi"}]},
        [1, 2, 3],
    ],
)
def test_bad_fields_are_400(api, body):
    _error(api.post("/v1/chat/completions", json=body), 400, "invalid_request")


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("max_tokens", 10.5),
        ("n", "1"),
        ("stream", "yes"),
        ("stream", 1),
        ("temperature", "0.5"),
        ("temperature", False),
        ("seed", "7"),
        ("stream_options", {"include_usage": "yes"}),
    ],
)
def test_wrong_types_are_400_not_coerced(api, field, value):
    """Issue 12 #7: OpenAI refuses these; quietly coercing them hides a client's bug."""
    body = {"model": "fake-model", "messages": HI, field: value}
    message = _error(api.post("/v1/chat/completions", json=body), 400, "invalid_request")["message"]
    assert field in message
    assert api.post("/v1/chat/completions", json={"model": "fake-model", "messages": HI}).status_code == 200


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", "content": '
         '"a\\ud800b"}]}'),
        ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", "content": '
         '[{"type": "text", "text": "\\udfff"}]}]}'),
        ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], '
         '"stop": ["x", "\\ud83d"]}'),
        ("/v1/completions", '{"model": "fake-model", "prompt": "\\ud83d"}'),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_and_the_connection_stays_usable(api, path, raw):
    """Issue 12 #7: was a 500 (tokenizer TypeError) that left the keep-alive connection unusable."""
    response = api.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert "lone UTF-16 surrogate" in _error(response, 400, "invalid_request")["message"]
    paired = '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    response = api.post("/v1/chat/completions", content=paired, headers={"Content-Type": "application/json"})
    assert response.status_code == 200  # a real pair is a character (an emoji): fine, on the same connection


def test_an_unexpected_error_closes_its_connection(api, fake, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(fake, "list_models", broken)
    response = api.get("/v1/models")
    _error(response, 500, "internal_error")
    assert response.headers["connection"] == "close"  # the client opens a fresh one for its next request
    monkeypatch.undo()
    assert api.get("/v1/models").status_code == 200


def test_shutdown_ends_open_streams_with_an_error_event_and_done(tmp_path):
    """Issue 12 #6: the openai client raised a bare connection error when the engine stopped mid-reply."""
    from engine.api.app import end_open_streams

    fake = FakeEngineService(tmp_path, token_delay=0.3)
    app = create_app(fake, TOKEN)
    with ApiServer(app) as server:
        body = {"model": "fake-model", "messages": HI, "stream": True}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.stream(
            "POST", server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=10
        ) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines)[len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"
            end_open_streams(app)  # what `pollinate-engine run` does first when it stops
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert error["type"] == "engine_not_ready" and "shutting down" in error["message"]
        late = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert late.status_code == 503  # a request that arrives while stopping is refused, not cut
    deadline = time.monotonic() + 5
    while fake.sessions_closed < fake.sessions_open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.sessions_open == fake.sessions_closed == 1  # the generation stopped and closed its session


def test_unknown_model_is_404(api):
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    _error(api.post("/v1/chat/completions", json=body), 404, "model_not_found")
    _error(api.post("/v1/chat/completions", json={**body, "stream": True}), 404, "model_not_found")
    _error(api.get("/api/hosting/plan", params={"model": "no-such-model"}), 404, "model_not_found")
    _error(api.get("/api/swarm", params={"model": "no-such-model"}), 404, "model_not_found")


def test_missing_blocks_are_503_and_named(api):
    body = {"model": "fake-broken", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    error = _error(api.post("/v1/chat/completions", json=body), 503, "swarm_unavailable")
    assert error["missing_blocks"] == [2, 3]


def test_unknown_path_is_json_404(api):
    _error(api.get("/v2/nothing"), 404, "not_found")
    _error(api.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_context_overflow_is_400(fake):
    """The fake's context is 2048 tokens; the service's InvalidRequestError maps to 400."""
    with ApiServer(create_app(fake, TOKEN)) as server:
        body = {"model": "fake-model", "prompt": "word " * 2000, "max_tokens": 100}
        response = httpx.post(
            server.base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        _error(response, 400, "invalid_request")


# ---- OpenAI shapes ---------------------------------------------------------------------------------------


def test_chat_completion_whole(api):
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    answer = api.post("/v1/chat/completions", json=body).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": FAKE_REPLY}
    assert answer["choices"][0]["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_chat_completion_stream_with_stop_and_usage(api):
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stop": ["canned"],
        "stream_options": {"include_usage": True},
    }
    with api.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == FAKE_REPLY[: FAKE_REPLY.index("canned")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_completion_length_limit(api):
    answer = api.post(
        "/v1/completions", json={"model": "fake-model", "prompt": "a b", "max_tokens": 2}
    ).json()
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == " ".join(FAKE_REPLY.split()[:2])
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2


def test_models_list(api):
    models = api.get("/v1/models").json()
    assert models["object"] == "list"
    entry = {m["id"]: m for m in models["data"]}["fake-broken"]
    assert entry["pollinate"]["missing_blocks"] == [2, 3] and entry["object"] == "model"


def test_stream_disconnect_cancels_generation(tmp_path):
    fake = FakeEngineService(tmp_path, token_delay=0.2)
    with ApiServer(create_app(fake, TOKEN)) as server:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.stream(
            "POST", server.base_url + "/v1/chat/completions", json=body, headers=headers
        ) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 5
        while fake.sessions_closed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.sessions_open == fake.sessions_closed == 1
        assert fake._requests == 0  # cancelled before finishing


# ---- control ---------------------------------------------------------------------------------------------


def _wait_state(api, state: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := api.get("/api/status").json())["state"] != state:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def test_hosting_states(api):
    _error(api.post("/api/hosting/stop"), 409, "wrong_state")
    response = api.post("/api/hosting/start", json={"model": "fake-model", "blocks": "1:3"})
    assert response.status_code == 202 and response.json()["state"] == "loading"
    _error(api.post("/api/hosting/start", json={}), 409, "wrong_state")
    assert _wait_state(api, "serving")["blocks"] == [1, 3]
    _error(api.post("/api/hosting/start"), 409, "wrong_state")
    response = api.post("/api/hosting/stop", json={"grace_seconds": 1})
    assert response.status_code == 202 and response.json()["state"] == "draining"
    _wait_state(api, "idle")


@pytest.mark.parametrize(
    "body",
    [{"blocks": "3:1"}, {"blocks": "x"}, {"blocks": "0"}, {"quant": "int3"}, {"memory_fraction": 0},
     {"colour": "red"}],
)  # fmt: skip
def test_hosting_start_bad_body_is_400(api, body):
    _error(api.post("/api/hosting/start", json=body), 400, "invalid_request")


@pytest.mark.parametrize("body", [{}, {"memory_fraction": 0}, {"memory_fraction": 1.5}, {"blocks": "2"}])
def test_hosting_resize_bad_body_is_400(api, body):
    _error(api.post("/api/hosting/resize", json=body), 400, "invalid_request")


def test_hosting_resize_while_idle_is_409(api):
    _error(api.post("/api/hosting/resize", json={"memory_fraction": 0.5}), 409, "wrong_state")


def test_status_stats_hardware_swarm_plan(api):
    status = api.get("/api/status").json()
    assert status["state"] == "idle" and status["swarm"] == "local" and status["ready"] is True
    stats = api.get("/api/stats").json()
    assert stats["points"] == 0.0 and stats["uptime_seconds"] >= 0
    hardware = api.get("/api/hardware").json()
    assert isinstance(hardware["gpus"], list) and hardware["cpu"]["cores"] >= 1
    assert hardware["ram"]["total_bytes"] > 0 and hardware["disk"]["total_bytes"] > 0
    swarm = api.get("/api/swarm").json()
    assert swarm["model"] == "fake-model" and len(swarm["blocks"]) == swarm["total_blocks"]
    plan = api.get("/api/hosting/plan").json()
    assert plan["total_bytes"] == plan["weights_bytes"] + plan["cache_bytes"]


def test_events_push_status_changes(api):
    with api.stream("GET", "/api/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        seen: list[tuple[str, dict]] = []
        keepalive = False
        kind = None
        api_thread_client = httpx.Client(base_url=api.base_url, headers=api.headers)
        for line in lines:
            if line.startswith(":"):
                keepalive = True
                if not any(k == "status" and d["state"] != "idle" for k, d in seen):
                    api_thread_client.post("/api/hosting/start", json={})
            elif line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line[len("data: ") :])))
            if keepalive and any(k == "status" and d["state"] == "serving" for k, d in seen):
                break
        api_thread_client.close()
    assert seen[0][0] == "status" and seen[0][1]["state"] == "idle"
    assert seen[1][0] == "stats"
    states = [d["state"] for k, d in seen if k == "status"]
    assert "loading" in states and states[-1] == "serving"


def test_sse_framing():
    assert sse_event("status", {"a": 1}) == b'event: status\ndata: {"a":1}\n\n'
    assert sse_event(None, "[DONE]") == b"data: [DONE]\n\n"
    assert sse_event(None, "two\nlines") == b"data: two\ndata: lines\n\n"


# ---- token storage ---------------------------------------------------------------------------------------


class _MemoryKeyring:
    """An in-memory keyring backend (the real one is never touched by tests)."""

    priority = 1

    def __init__(self):
        self.passwords = {}

    def get_password(self, service, user):
        return self.passwords.get((service, user))

    def set_password(self, service, user, password):
        self.passwords[(service, user)] = password

    def delete_password(self, service, user):
        self.passwords.pop((service, user), None)


@pytest.fixture
def keyring_backend():
    import keyring

    previous = keyring.get_keyring()
    yield keyring
    keyring.set_keyring(previous)


def test_token_in_keyring(keyring_backend, tmp_path):
    from keyring.backend import KeyringBackend

    class Memory(_MemoryKeyring, KeyringBackend):
        pass

    backend = Memory()
    keyring_backend.set_keyring(backend)
    first = load_or_create_token(tmp_path)
    assert first.source == "keyring" and first.file is None and len(first.value) >= 32
    assert backend.passwords[(KEYRING_SERVICE, KEYRING_USER)] == first.value
    assert load_or_create_token(tmp_path).value == first.value
    assert not (tmp_path / "engine-api-token").exists()


@pytest.mark.parametrize("backend_name", ["fail", "chainer-empty", "null"])
def test_token_file_fallback_without_keyring(keyring_backend, tmp_path, backend_name):
    from keyring.backends import chainer, fail, null

    backend = {
        "fail": fail.Keyring,
        "chainer-empty": lambda: _EmptyChainer(),
        "null": null.Keyring,
    }[backend_name]()
    if backend_name == "chainer-empty":
        assert backend.backends == []
        assert isinstance(backend, chainer.ChainerBackend)
    keyring_backend.set_keyring(backend)
    first = load_or_create_token(tmp_path)
    assert first.source == "file" and first.file == tmp_path / "engine-api-token"
    assert first.file.read_text() == first.value
    if os.name == "posix":
        assert stat.S_IMODE(first.file.stat().st_mode) == 0o600
    again = load_or_create_token(tmp_path)
    assert again.value == first.value


def _empty_chainer_class():
    from keyring.backends.chainer import ChainerBackend

    class Empty(ChainerBackend):
        @property
        def backends(self):
            return []

    return Empty


class _EmptyChainer:
    def __new__(cls):
        return _empty_chainer_class()()


def test_token_file_permissions_are_repaired(tmp_path):
    path = tmp_path / "engine-api-token"
    path.write_text("abc")
    path.chmod(0o644)
    token = load_or_create_token(tmp_path, use_keyring=False)
    assert token.value == "abc"
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
