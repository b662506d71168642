"""A real `pollinate-engine run` on a local swarm: OpenAI client parity with transformers, hosting lifecycle.

One engine process serves the whole module (starting one takes a few seconds): the local swarm's demo
server covers the demo model, and hosting tests share a tiny checkpoint of their own through the API.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from contract import LoadPhase
from tests.helpers.engine_run import engine_process

pytestmark = pytest.mark.slow

RSS_MARGIN_BYTES = 150 * 2**20  # a start/stop cycle of the ~75 MB test model must give its memory back


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("engine")
    with engine_process(data_dir, "--demo-model", "tiny") as (_process, state, client):
        client.data_dir = data_dir
        client.state = state
        yield client


def _local_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
        )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def _chat_prompt_ids(path: Path, messages: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_state_file_and_token(engine):
    state = engine.state
    assert state["pid"] > 0 and state["base_url"] == f"http://127.0.0.1:{state['port']}"
    assert state["token_source"] == "file"
    assert (os.stat(state["token_file"]).st_mode & 0o777) == 0o600
    assert httpx.get(state["base_url"] + "/api/status").status_code == 401
    assert httpx.get(state["base_url"] + "/api/health").json()["pid"] == state["pid"]


def test_openai_stream_equals_local_greedy(engine):
    import openai

    from engine.demo import DEMO_MODEL_NAME, demo_model_path

    client = openai.OpenAI(base_url=engine.state["base_url"] + "/v1", api_key=engine.token)
    assert DEMO_MODEL_NAME in [m.id for m in client.models.list().data]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
    ]
    stream = client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=messages,
        stream=True,
        temperature=0,
        max_tokens=24,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    path = demo_model_path(engine.data_dir)
    prompt_ids = _chat_prompt_ids(path, messages)
    expected = _local_greedy(path, prompt_ids, 24)
    assert text == expected and text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(prompt_ids) and 0 < usage.completion_tokens <= 24
    # Speed figures ride along with the usage: time to first token, decode rate, speculation counters.
    timings = chunks[-1].model_extra["timings"]
    assert timings["predicted_n"] == usage.completion_tokens and timings["prompt_ms"] > 0
    speculation = timings["speculation"]  # on by default: the demo servers can roll their caches back
    assert 1 <= speculation["rounds"] <= usage.completion_tokens
    per_round = usage.completion_tokens / speculation["rounds"]
    assert speculation["tokens_per_round"] == pytest.approx(per_round, rel=1e-2)
    assert speculation["drafter"] == "prompt_lookup"  # no feature drafter is shipped for the tiny model

    whole = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=messages, temperature=0, max_tokens=24
    )
    assert whole.choices[0].message.content == expected
    assert whole.model_extra["timings"]["predicted_n"] == whole.usage.completion_tokens


def test_completions_and_stop(engine):
    import openai

    from engine.demo import DEMO_MODEL_NAME, demo_model_path

    client = openai.OpenAI(base_url=engine.state["base_url"] + "/v1", api_key=engine.token)
    from transformers import AutoTokenizer

    path = demo_model_path(engine.data_dir)
    prompt = "The quick brown fox"
    expected = _local_greedy(path, AutoTokenizer.from_pretrained(path)(prompt)["input_ids"], 16)
    answer = client.completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert answer.choices[0].text == expected
    stop = expected.strip()[3:6]
    stopped = client.completions.create(
        model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # Sampling with a seed is repeatable.
    sampled = [
        client.completions.create(
            model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_chat_fits_the_context(engine):
    """A long conversation: refused as is; with fit_context the oldest turns go and max_tokens shrinks."""
    demo = next(m for m in engine.get("/v1/models").json()["data"] if m["pollinate"]["demo"])
    context = demo["pollinate"]["context_length"]
    long = "hello " * (context // 20)  # about a tenth of the context per turn (two tokens per word)
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(6):
        messages += [{"role": "user", "content": f"{turn} {long}"}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "And now?"})
    body = {"model": demo["id"], "messages": messages, "max_tokens": context // 2, "temperature": 0}
    refused = engine.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and f"at most {context} tokens" in refused.json()["error"]["message"]
    answer = engine.post("/v1/chat/completions", json={**body, "pollinate": {"fit_context": True}})
    assert answer.status_code == 200, answer.text
    fit = answer.json()["pollinate"]
    # Whole user/assistant pairs went (the kept turns start with a user turn); the system prompt stayed.
    assert fit["dropped_messages"] > 0 and fit["dropped_messages"] % 2 == 0
    assert fit["context_length"] == context and fit["prompt_tokens"] + fit["max_tokens"] <= context
    # ... and only as many as needed: the reply keeps a quarter of the context, the last pair stays.
    assert fit["max_tokens"] == min(context // 2, context - fit["prompt_tokens"]) >= context // 4
    assert fit["dropped_messages"] < 12 and fit["prompt_tokens"] > context // 4
    assert answer.json()["usage"]["prompt_tokens"] == fit["prompt_tokens"]


def test_real_service_errors(engine):
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    response = engine.post("/v1/chat/completions", json=body)
    assert response.status_code == 404 and response.json()["error"]["type"] == "model_not_found"
    response = engine.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    response = engine.get("/api/status", headers={"Host": "attacker.example"})
    assert response.status_code == 403
    hardware = engine.get("/api/hardware").json()
    assert hardware["gpus"] == [] or hardware["gpus"][0]["total_bytes"] > 0


def _wait_state(engine, state: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := engine.get("/api/status").json())["state"] != state:
        assert status["state"] != "error", status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


@pytest.fixture(scope="module")
def hosted_model(tiny_checkpoint_factory):
    """A tiny llama big enough (~75 MB of weights) for a memory check to mean something."""
    return tiny_checkpoint_factory("llama", num_layers=8, hidden_size=512, seed=3)


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def test_hosting_lifecycle_and_stop_while_serving(engine, hosted_model):
    model = str(hosted_model)
    plan = engine.get("/api/hosting/plan", params={"model": model}).json()
    assert plan["total_blocks"] == 8 and plan["weights_bytes"] > 50 * 2**20

    response = engine.post("/api/hosting/start", json={"model": model, "blocks": "0:8"})
    assert response.status_code == 202, response.text
    second = engine.post("/api/hosting/start", json={"model": model})
    assert second.status_code == 409 and second.json()["error"]["type"] == "wrong_state"
    status = _wait_state(engine, "serving")
    assert status["blocks"] == [0, 8] and status["model"] == model
    # Once serving, the host asks the swarm (here the demo server) to dial it back.
    deadline = time.monotonic() + 60
    while (reach := engine.get("/api/status").json()["reachability"]) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert reach is not None and reach["state"] == "reachable" and reach["advice"] is None, reach

    # A long completion runs through our host while we stop it: it finishes, whole and correct.
    from transformers import AutoTokenizer

    prompt = "Hello! How are you today?"
    prompt_ids = AutoTokenizer.from_pretrained(hosted_model)(prompt)["input_ids"]
    max_tokens = 400
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: list[dict] = []
    pieces: list[str] = []
    finish: list[str] = []
    with engine.stream("POST", "/v1/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                break
        assert engine.get("/api/stats").json()["sessions_active"] == 1
        stop = engine.post("/api/hosting/stop", json={"grace_seconds": 60})
        assert stop.status_code == 202 and stop.json()["state"] == "draining"
        for line in lines:
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    usage.append(chunk["usage"])
                    continue
                pieces.append(chunk["choices"][0]["text"])
                if chunk["choices"][0]["finish_reason"]:
                    finish.append(chunk["choices"][0]["finish_reason"])
    assert finish in (["length"], ["stop"])  # stop: the random model wrote its end-of-text token
    assert "".join(pieces) == _local_greedy(hosted_model, prompt_ids, max_tokens)
    _wait_state(engine, "idle")

    # With our host gone, the model has no server: a clear 503 that names the blocks.
    again = engine.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})
    assert again.status_code == 503
    assert again.json()["error"]["missing_blocks"] == list(range(8))
    stats = engine.get("/api/stats").json()
    # Every token but the last went through our host (the last one is never fed back).
    assert stats["tokens_served"] >= usage[0]["total_tokens"] - 1 and stats["hosting_seconds"] > 0
    assert engine.post("/api/hosting/stop").status_code == 409
    assert engine.get("/api/status").json()["reachability"] is None  # nothing hosted, nothing to reach


def test_hosting_cycles_return_memory(engine, hosted_model):
    pid = engine.state["pid"]
    readings = []
    for _cycle in range(3):
        assert (
            engine.post("/api/hosting/start", json={"model": str(hosted_model), "blocks": "0:8"}).status_code
            == 202
        )
        _wait_state(engine, "serving")
        # On CPU the weights may be zero-copy views of the safetensors files: a request touches them all.
        body = {"model": str(hosted_model), "prompt": "Hello", "max_tokens": 2}
        assert engine.post("/v1/completions", json=body).status_code == 200
        loaded = _rss(pid)
        assert engine.post("/api/hosting/stop", json={"grace_seconds": 0}).status_code == 202
        _wait_state(engine, "idle")
        readings.append((loaded, _rss(pid)))
    # The first cycle warms caches (imports, allocator pools); later cycles must not keep the weights.
    baseline = readings[0][1]
    print("RSS MB (serving, after stop):", [(round(a / 2**20), round(b / 2**20)) for a, b in readings])
    assert readings[-1][0] - readings[-1][1] > 30 * 2**20, "the hosted weights should be visible in RSS"
    assert readings[-1][1] - baseline < RSS_MARGIN_BYTES


def test_events_report_progress(engine, hosted_model):
    seen: list[tuple[str, dict]] = []

    def listen():
        with engine.stream("GET", "/api/events", timeout=60) as response:
            kind = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    seen.append((kind, json.loads(line[6:])))
                    if kind == "status" and seen[-1][1]["state"] == "serving":
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    started = engine.post("/api/hosting/start", json={"model": str(hosted_model), "blocks": "2:6"})
    assert started.status_code == 202 and started.json()["phase"] == LoadPhase.PREPARING
    listener.join(60)
    statuses = [d for k, d in seen if k == "status"]
    assert statuses[0]["state"] == "idle"
    loading = [s for s in statuses if s["state"] == "loading"]
    assert loading and all(0.0 <= s["progress"] <= 1.0 for s in loading)
    # Typed phases, in the order a start goes through them, and progress that never goes back.
    phases = [LoadPhase(s["phase"]) for s in loading]
    assert phases  # (a listener gets the newest event of each kind: phases may be skipped, never reordered)
    order = [list(LoadPhase).index(p) for p in phases]
    assert order == sorted(order)
    assert [s["progress"] for s in loading] == sorted(s["progress"] for s in loading)
    assert all(s["message"] == LoadPhase(s["phase"]).words for s in loading)
    assert statuses[-1]["state"] == "serving" and statuses[-1]["blocks"] == [2, 6]
    assert statuses[-1]["phase"] is None and statuses[-1]["progress"] is None
    assert engine.post("/api/hosting/stop", json={"grace_seconds": 0}).status_code == 202
    _wait_state(engine, "idle")
