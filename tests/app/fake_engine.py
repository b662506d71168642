"""A fake engine: a stdlib HTTP server that speaks docs/API.md (including SSE) with controllable behaviour.

Used in-process by the app tests (FakeEngine), or as a child process (`python tests/app/fake_engine.py`) that
writes engine-state.json like the real engine, for the EngineProcess start/crash/restart tests.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

# Run as a script, this file's folder leads sys.path: the repository root holds the contract.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import psutil

from contract import CPU_MEMORY_SHARE, STATE_FILE, ContextFit, HostingPlan, ModelFacts, Stats, Status

TOKEN = "fake-token"
DEMO_ID = "pollinate-demo-tiny-llama"
GiB = 1024**3


class FakeEngine:
    """State and controls of the fake engine; `start()` serves it on 127.0.0.1:0."""

    def __init__(self, num_blocks: int = 8, words: int = 12, word_delay: float = 0.02, gpu: bool = True):
        self.lock = threading.Lock()
        self.num_blocks = num_blocks
        self.words = words
        self.word_delay = word_delay
        self.load_steps = 4
        self.load_delay = 0.05
        self.reply_text: str | None = None  # streamed word by word instead of the echo
        self.chat_error: tuple[int, dict] | None = None  # (status, error object) for the next chats
        self.hosting_error: tuple[int, dict] | None = None
        self.status = Status(ready=True).to_dict()
        self.stats = Stats().to_dict()
        self.hardware = {
            "gpus": [
                {
                    "index": 0,
                    "name": "NVIDIA GeForce RTX 4090",
                    "backend": "cuda",
                    "total_bytes": 24 * GiB,
                    "free_bytes": 21 * GiB,
                }
            ]
            if gpu
            else [],
            "cpu": {"name": "AMD Ryzen 9 7950X", "cores": 16},
            "ram": {"total_bytes": 64 * GiB, "available_bytes": 48 * GiB},
            "disk": {
                "path": "/home/user/.cache/huggingface",
                "total_bytes": 1000 * GiB,
                "free_bytes": 420 * GiB,
            },
        }
        self.models = [
            {
                "id": "meta-llama/Llama-3.1-8B-Instruct",
                "object": "model",
                "owned_by": "swarm",
                "pollinate": ModelFacts(
                    label="Llama 3.1 8B Instruct", num_blocks=32, context_length=8192
                ).to_dict(),
            },
            {
                "id": DEMO_ID,
                "object": "model",
                "owned_by": "pollinate",
                "pollinate": ModelFacts(
                    label="Demo model (tiny, random weights: its replies are gibberish)",
                    demo=True,
                    random_weights=True,
                    num_blocks=num_blocks,
                    context_length=512,
                ).to_dict(),
            },
        ]
        self.servers_per_block = [1] * num_blocks
        self.requests: list[tuple[str, str, dict | None]] = []
        self.chats_started = 0
        self.chats_cancelled = 0
        self.chats_completed = 0
        self.policy: dict = {
            "settings": {},
            "detectors": {
                "gpu": {
                    "value": None,
                    "detail": "",
                    "unsupported": "no NVIDIA driver on this machine",
                    "until": None,
                },
                "cpu": {"value": 3.0, "detail": "", "unsupported": None, "until": None},
            },
            "decision": {"pause": False},
        }
        self.stalled: set[str] = set()  # paths answered only when the engine stops (a wedged engine)
        self.fits: list[ContextFit] = []  # how each chat request fitted the model's context
        self._subscribers: list[queue.Queue] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.closing = threading.Event()

    # ---- lifecycle

    def start(self) -> str:
        engine = self

        class Handler(FakeHandler):
            fake = engine

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.base_url

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def write_state_file(self, data_dir: Path, pid: int | None = None) -> Path:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        token_file = data_dir / "engine-token"
        token_file.write_text(TOKEN)
        os.chmod(token_file, 0o600)
        process = psutil.Process(pid or os.getpid())
        state = {
            "pid": process.pid,
            "process_started": process.create_time(),  # the engine's identity beyond its pid
            "cmdline": process.cmdline(),
            "port": self.port,
            "base_url": self.base_url,
            "token_source": "file",
            "token_file": str(token_file),
            "version": "0.1.0-fake",
            "started_at": time.time(),
        }
        path = data_dir / STATE_FILE
        path.write_text(json.dumps(state))
        return path

    # ---- behaviour

    def publish(self, event: str, data: dict) -> None:
        with self.lock:
            for subscriber in self._subscribers:
                subscriber.put((event, data))

    def set_status(self, **changes) -> None:
        with self.lock:
            self.status = {**self.status, **changes}
            status = dict(self.status)
        self.publish("status", status)

    def add_stats(self, tokens: int = 0, requests: int = 0, **changes) -> None:
        with self.lock:
            self.stats["tokens_served"] += tokens
            self.stats["requests_served"] += requests
            self.stats["lifetime_tokens_served"] += tokens  # (no earlier runs in the fake)
            self.stats["lifetime_requests_served"] += requests
            self.stats.update(changes)
            stats = dict(self.stats)
        self.publish("stats", stats)

    def start_hosting(self) -> None:
        self.set_status(
            state="loading",
            progress=0.0,
            model=DEMO_ID,
            blocks=[0, self.num_blocks // 2],
            message="Loading blocks 0–3",
        )

        def load():
            for step in range(1, self.load_steps + 1):
                time.sleep(self.load_delay)
                if self.status["state"] != "loading":
                    return
                self.set_status(progress=step / self.load_steps)
            for i in range(0, self.num_blocks // 2):
                self.servers_per_block[i] += 1
            self.set_status(state="serving", progress=None, message=None)

        threading.Thread(target=load, daemon=True).start()

    def stop_hosting(self) -> None:
        self.set_status(state="idle", progress=None, model=None, blocks=None, message=None, pause=None)
        for i in range(0, self.num_blocks // 2):
            self.servers_per_block[i] = max(0, self.servers_per_block[i] - 1)

    def swarm(self) -> dict:
        missing = [i for i, n in enumerate(self.servers_per_block) if n == 0]
        return {
            "model": DEMO_ID,
            "dht_prefix": "pollinate-demo-tiny-llama-hf",
            "total_blocks": self.num_blocks,
            "blocks": [
                {"index": i, "servers": n, "throughput": 10.0 * n}
                for i, n in enumerate(self.servers_per_block)
            ],
            "servers": [
                {
                    "peer_id": "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
                    "public_name": "demo server",
                    "start_block": 0,
                    "end_block": self.num_blocks,
                    "state": "online",
                    "throughput": 10.0,
                    "version": "0.1.0",
                    "cache_tokens_left": 4096,
                    "quant_type": "none",
                    "torch_dtype": "float32",
                    "reachability": "direct",
                    "points": None,
                    "observed_contribution": None,
                }
            ],
            "missing_blocks": missing,
            "models": [
                {
                    "dht_prefix": "pollinate-demo-tiny-llama-hf",
                    "repository": None,
                    "num_blocks": self.num_blocks,
                    "covered_blocks": self.num_blocks - len(missing),
                    "missing_blocks": missing,
                    "complete": not missing,
                    "servers": 1,
                }
            ],
        }

    def plan(self, quant: str | None = None, memory_fraction: float | None = None) -> dict:
        """Like the engine: the quantization asked for (auto: nf4 on the GPU) and the memory share."""
        half = self.num_blocks // 2
        gpu = bool(self.hardware["gpus"])
        quant = ("nf4" if gpu else "none") if quant in (None, "auto") else quant
        # Like engine/server/placement.py: a GPU's free memory, or what CPU hosting may use of the RAM.
        free = self.hardware["gpus"][0]["free_bytes"] if gpu else self.hardware["ram"]["available_bytes"]
        free = free if gpu else free * CPU_MEMORY_SHARE
        return HostingPlan(
            model=DEMO_ID,
            dht_prefix="pollinate-demo-tiny-llama-hf",
            start_block=0,
            end_block=half,
            num_blocks=half,
            total_blocks=self.num_blocks,
            quant=quant,
            dtype="float16" if gpu else "float32",
            device="cuda" if gpu else "cpu",
            memory_kind="gpu" if gpu else "ram",
            budget_bytes=int(free * (memory_fraction or 1.0)),
            weights_bytes=3 * 1024**2,
            cache_bytes=16 * 1024**2,
            total_bytes=19 * 1024**2,
        ).to_dict()


def prompt_tokens(messages: list[dict]) -> int:
    """The fake's tokenizer: a word is a token, and each message costs 4 more (its template)."""
    return sum(len(str(m.get("content") or "").split()) + 4 for m in messages)


def fit_context(body: dict, context: int) -> ContextFit | str:
    """What the engine does with a chat request: refuse what does not fit (the error message), or with
    `pollinate.fit_context` leave out the oldest turns and lower max_tokens."""
    messages = list(body["messages"])
    asked = int(body.get("max_tokens") or context)
    dropped = 0
    if (body.get("pollinate") or {}).get("fit_context"):
        reserve = min(asked, context // 4)
        while prompt_tokens(messages) + reserve > context and len(messages) > 2:
            first = next(i for i, m in enumerate(messages) if m["role"] != "system")
            if first >= len(messages) - 1:
                break
            messages.pop(first)
            dropped += 1
        used = prompt_tokens(messages)
        if used >= context:
            return f"The prompt has {used} tokens; the model reads at most {context} tokens."
        return ContextFit(used, context, min(asked, context - used), dropped)
    used = prompt_tokens(messages)
    if used + asked > context:
        return (
            f"The prompt ({used} tokens) plus max_tokens ({asked}) exceeds the context of {context} tokens; "
            f"ask for at most {context - used} new tokens."
        )
    return ContextFit(used, context, asked, 0)


def error_body(status: int, kind: str, message: str, **extra) -> dict:
    return {"error": {"message": message, "type": kind, "code": status, **extra}}


class FakeHandler(BaseHTTPRequestHandler):
    fake: FakeEngine
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._json(401, error_body(401, "unauthorized", "Missing or wrong token."))
        return False

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}") if length else {}

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _sse(self, data: str, event: str | None = None) -> None:
        text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        self.wfile.write(text.encode())
        self.wfile.flush()

    def do_GET(self) -> None:
        fake = self.fake
        url = urlparse(self.path)
        fake.requests.append(("GET", url.path, None))
        if url.path in fake.stalled:
            fake.closing.wait()
            return None
        if url.path == "/api/health":
            return self._json(200, {"status": "ok", "version": "0.1.0-fake", "pid": os.getpid()})
        if not self._authorized():
            return None
        query = parse_qs(url.query)
        routes = {
            "/api/status": lambda: fake.status,
            "/api/stats": lambda: fake.stats,
            "/api/hardware": lambda: fake.hardware,
            "/api/hosting/plan": lambda: fake.plan(
                query.get("quant", [None])[0], float(query.get("memory_fraction", ["1"])[0])
            ),
            "/api/swarm": fake.swarm,
            "/api/policy": lambda: fake.policy,
            "/v1/models": lambda: {"object": "list", "data": fake.models},
        }
        if url.path == "/api/events":
            return self._events()
        if url.path != "/api/status" and url.path in routes and not fake.status["ready"]:
            message = "The engine is still starting (Joining the swarm); try again in a moment."
            return self._json(503, error_body(503, "engine_not_ready", message))
        if url.path in routes:
            return self._json(200, routes[url.path]())
        return self._json(404, error_body(404, "not_found", f"No route {url.path}"))

    def _events(self) -> None:
        subscriber: queue.Queue = queue.Queue()
        with self.fake.lock:
            self.fake._subscribers.append(subscriber)
        try:
            self._sse_start()
            self.wfile.write(b": connected\n\n")
            self.wfile.flush()
            while not self.fake.closing.is_set():
                try:
                    event, data = subscriber.get(timeout=0.5)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                self._sse(json.dumps(data), event)
        except OSError:
            pass
        finally:
            with self.fake.lock:
                self.fake._subscribers.remove(subscriber)

    def do_PUT(self) -> None:
        fake = self.fake
        url = urlparse(self.path)
        if not self._authorized():
            return None
        body = self._body()
        fake.requests.append(("PUT", url.path, body))
        if url.path == "/api/policy":
            fake.policy = {**fake.policy, "settings": body}
            return self._json(200, fake.policy)
        return self._json(404, error_body(404, "not_found", f"No route {url.path}"))

    def do_POST(self) -> None:
        fake = self.fake
        url = urlparse(self.path)
        if not self._authorized():
            return None
        try:
            body = self._body()
        except ValueError:
            return self._json(400, error_body(400, "invalid_request", "Malformed JSON."))
        fake.requests.append(("POST", url.path, body))
        if url.path in fake.stalled:
            fake.closing.wait()
            return None
        if url.path == "/api/hosting/start":
            if fake.hosting_error:
                return self._json(fake.hosting_error[0], {"error": fake.hosting_error[1]})
            if fake.status["state"] != "idle":
                return self._json(409, error_body(409, "wrong_state", "Hosting is already on."))
            fake.start_hosting()
            return self._json(202, fake.status)
        if url.path == "/api/hosting/stop":
            if fake.status["state"] == "idle":
                return self._json(409, error_body(409, "wrong_state", "Hosting is off."))
            fake.stop_hosting()
            return self._json(202, fake.status)
        if url.path == "/api/hosting/pause":
            if fake.status["state"] != "serving":
                return self._json(409, error_body(409, "wrong_state", "Only a serving host can pause."))
            until = body.get("until") or (time.time() + body["seconds"] if body.get("seconds") else None)
            message = (
                "Paused by you until " + time.strftime("%a %H:%M", time.localtime(until))
                if until
                else "Paused by you"
            )
            pause = dict(reason="user", message=message, since=time.time(), until=until, mode="release")
            pause["source"] = "user"
            fake.set_status(state="paused", pause=pause)
            return self._json(202, fake.status)
        if url.path == "/api/hosting/resize":
            if fake.status["state"] in ("idle", "error"):
                return self._json(409, error_body(409, "wrong_state", "Nothing is shared."))
            return self._json(202, fake.status)
        if url.path == "/api/hosting/resume":
            if fake.status["state"] != "paused":
                return self._json(409, error_body(409, "wrong_state", "Sharing is not paused."))
            fake.set_status(state="serving", pause=None)
            return self._json(202, fake.status)
        if url.path == "/v1/chat/completions":
            return self._chat(body)
        return self._json(404, error_body(404, "not_found", f"No route {url.path}"))

    def _chat(self, body: dict) -> None:
        fake = self.fake
        if fake.chat_error:
            return self._json(fake.chat_error[0], {"error": fake.chat_error[1]})
        if body.get("model") not in [m["id"] for m in fake.models]:
            return self._json(404, error_body(404, "model_not_found", f"Unknown model {body.get('model')}"))
        model = next(m for m in fake.models if m["id"] == body["model"])
        fitted = fit_context(body, model["pollinate"]["context_length"])
        if isinstance(fitted, str):
            return self._json(400, error_body(400, "invalid_request", fitted))
        fake.chats_started += 1
        fake.fits.append(fitted)
        last = body["messages"][-1]["content"]
        words = [f"word{i}" for i in range(fake.words)]
        words[0] = f"You said **{last}**:"
        if fake.reply_text:
            words = fake.reply_text.split(" ")
        self._sse_start()
        try:
            for i, word in enumerate(words):
                if fake.closing.is_set():
                    return None
                time.sleep(fake.word_delay)
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "delta": {"content": (" " if i else "") + word}, "finish_reason": None}
                    ],
                }
                if i == 0:
                    chunk["pollinate"] = fitted.to_dict()
                self._sse(json.dumps(chunk))
            final = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(words),
                    "total_tokens": 5 + len(words),
                },
            }
            self._sse(json.dumps(final))
            self._sse("[DONE]")
            fake.chats_completed += 1
        except OSError:
            fake.chats_cancelled += 1
        return None


def main(argv: list[str] | None = None) -> int:
    """Run as the engine would: write engine-state.json to POLLINATE_DATA_DIR and serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--fail-start", action="store_true", help="exit at once with an error, like a broken engine"
    )
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--data-dir", default=None, help="like the engine's; default POLLINATE_DATA_DIR")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="like the engine's")
    args, _unknown = parser.parse_known_args(argv)
    if args.fail_start:
        print("RuntimeError: CUDA driver too old (fake)", file=sys.stderr, flush=True)
        return 3
    time.sleep(args.startup_delay)
    data_dir = Path(args.data_dir or os.environ["POLLINATE_DATA_DIR"])
    fake = FakeEngine()
    fake.start()
    state = fake.write_state_file(data_dir)
    print(f"fake engine serving on {fake.base_url}", flush=True)
    stdin_closed = threading.Event()
    if args.exit_on_stdin_eof:

        def watch() -> None:
            while os.read(0, 4096):
                pass
            stdin_closed.set()

        threading.Thread(target=watch, daemon=True).start()
    try:
        while not stdin_closed.is_set():
            time.sleep(0.2)
            fake.add_stats(tokens=1)
    except KeyboardInterrupt:
        pass
    finally:
        state.unlink(missing_ok=True)
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
