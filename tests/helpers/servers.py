"""Test helpers: servers that always shut down, and a minimal client that speaks the Petals 2.2 wire format.

`running_server` starts a BlockHost in this process; `running_server_process` runs `python -m engine.cli
serve` as a child (for kill -9 tests) and kills it on exit whatever happens. `WireClient` sends exactly
what a Petals 2.2 client sends (tensors packed with pack_args_kwargs' structure, the same metadata keys), so
tests can check the server without the real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.server.block_host import BlockHost
from engine.server.config import ServerConfig
from engine.tensor_packing import pack_args_kwargs

# --- servers ---


@contextlib.contextmanager
def running_server(
    model: str | Path,
    initial_peers: Sequence[str] = (),
    *,
    new_swarm: bool = False,
    on_progress=None,
    **config_fields,
) -> Iterator[BlockHost]:
    """A started in-process BlockHost on 127.0.0.1 (fixed throughput 1.0 unless given), stopped on exit."""
    config_fields.setdefault("host", "127.0.0.1")
    config_fields.setdefault("throughput", 1.0)
    config_fields.setdefault("device", "cpu")
    config_fields.setdefault("update_period", 10.0)
    config = ServerConfig(
        model=str(model), initial_peers=tuple(initial_peers), new_swarm=new_swarm, **config_fields
    )
    host = BlockHost(config, on_progress=on_progress)
    try:
        host.start()
        yield host
    finally:
        host.stop()


@dataclass
class ServerProcess:
    """A `pollinate-engine serve` child process and what it printed when it became ready."""

    process: subprocess.Popen
    peer_id: str
    multiaddrs: list[str]
    output: list[str] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL the server and its children (DHT process, p2p daemon): gone without announcing OFFLINE."""
        _kill_group(self.process, signal.SIGKILL)
        self.process.wait(10)


def _serve_command(model: str | Path, initial_peers: Sequence[str], extra_args: Sequence[str]) -> list[str]:
    command = [sys.executable, "-m", "engine.cli", "serve", str(model), "--host", "127.0.0.1"]
    if initial_peers:
        command += ["--initial-peers", *initial_peers]
    else:
        command += ["--new-swarm"]
    return command + list(extra_args)


@contextlib.contextmanager
def running_server_process(
    model: str | Path,
    initial_peers: Sequence[str] = (),
    *args: str,
    startup_timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Run `python -m engine.cli serve MODEL ... [args]` until it prints "ready"; always kill it on exit.

    Pass server options as extra strings, e.g. ("--blocks", "0:2", "--throughput", "1").
    """
    command = _serve_command(model, initial_peers, args)
    if "--throughput" not in args:
        command += ["--throughput", "1"]
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    # A session of its own, so the whole group (server, its DHT process, p2p daemons) can be killed at once:
    # killing only the server would leave its p2p daemon running, still reachable, and holding our pipe.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env,
        bufsize=1,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        peer_id, multiaddrs = _wait_until_ready(process, output, startup_timeout)
        yield ServerProcess(process, peer_id, multiaddrs, output)
    finally:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)
        _kill_group(process, signal.SIGKILL)  # whatever is left of the group (also after a clean exit)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)


def _kill_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _wait_until_ready(process: subprocess.Popen, output: list[str], timeout: float) -> tuple[str, list[str]]:
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            lines.append(output[-1])
            if output[-1].startswith("ready"):
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout) or not any(line.startswith("ready") for line in lines):
        tail = "\n".join(output[-30:])
        raise RuntimeError(f"server process did not become ready in {timeout:.0f} s; its output:\n{tail}")
    peer_id = next(m.group(1) for line in lines if (m := re.match(r"peer_id: (\S+)", line)))
    multiaddrs = [m.group(1) for line in lines if (m := re.match(r"multiaddr: (\S+)", line))]
    return peer_id, multiaddrs


# --- a minimal Petals-format client ---

DUMMY = torch.empty(0)
DUMMY_INT64 = torch.empty(0, dtype=torch.int64)


def pack_args(*args: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """Petals' pack_args_kwargs for positional tensors: the tensors and ((b"__T0", ...), {})."""
    return pack_args_kwargs(*args)


class WireClient:
    """Calls a block server's RPCs as a Petals 2.2 client would (blocking, over a private event loop)."""

    def __init__(self, server_maddrs: Sequence[str]):
        from hivemind.p2p import P2P, PeerID

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.p2p = self.run(P2P.create(initial_peers=list(server_maddrs)))
        self.peer_id = PeerID.from_base58(str(server_maddrs[0]).rsplit("/p2p/", 1)[1])

    def run(self, coroutine, timeout: float = 60.0):
        """Run a coroutine on the client's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def close(self) -> None:
        """Stop the client's p2p daemon and loop."""
        with contextlib.suppress(Exception):
            self.run(self.p2p.shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stub(self):
        from engine.server.handler import TransformerConnectionHandler

        return TransformerConnectionHandler.get_stub(self.p2p, self.peer_id)

    def info(self, uid: str = "") -> dict:
        """rpc_info, decoded."""
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer

        response = self.run(self.stub.rpc_info(runtime_pb2.ExpertUID(uid=uid)))
        return MSGPackSerializer.loads(response.serialized_info)

    def call(
        self, method: str, uid: str, tensors: Sequence[torch.Tensor], metadata: dict
    ) -> list[torch.Tensor]:
        """A unary rpc_forward / rpc_backward with raw tensors and metadata; returns the decoded outputs."""
        from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer

        request = runtime_pb2.ExpertRequest(
            uid=uid,
            tensors=[serialize_torch_tensor(t) for t in tensors],
            metadata=MSGPackSerializer.dumps(metadata),
        )
        response = self.run(getattr(self.stub, method)(request))
        return [deserialize_torch_tensor(t) for t in response.tensors]

    def call_stream(self, method: str, uid: str, tensors, metadata: dict, chunk: int = 2**12) -> list:
        """rpc_forward_stream / rpc_backward_stream, tensors split into `chunk`-byte parts as Petals does."""
        from hivemind.compression import deserialize_tensor_stream, serialize_torch_tensor
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer
        from hivemind.utils.asyncio import iter_as_aiter
        from hivemind.utils.streaming import split_for_streaming

        raw = MSGPackSerializer.dumps(metadata)
        parts = [
            runtime_pb2.ExpertRequest(uid=uid, tensors=[part], metadata=raw)
            for tensor in tensors
            for part in split_for_streaming(serialize_torch_tensor(tensor), chunk)
        ]

        async def go():
            outputs = await getattr(self.stub, method)(iter_as_aiter(parts))
            return await deserialize_tensor_stream(message.tensors async for message in outputs)

        return self.run(go())

    def forward(
        self, uid: str, hidden: torch.Tensor, prompts: torch.Tensor = DUMMY, **metadata
    ) -> torch.Tensor:
        """Petals' run_remote_forward: (hidden, prompts) packed, points/active_adapter/args_structure."""
        flat, structure = pack_args(hidden, prompts)
        meta = {"points": 0.0, "active_adapter": "", "args_structure": structure, **metadata}
        return self.call("rpc_forward", uid, flat, meta)[0]

    def backward(self, uid: str, inputs, grad_outputs, prompts: torch.Tensor = DUMMY, **metadata) -> list:
        """Petals' run_remote_backward: (inputs, grad_outputs, prompts); returns [grad_in(, grad_prompts)]."""
        flat, structure = pack_args(inputs, grad_outputs, prompts)
        meta = {"points": 0.0, "active_adapter": "", "args_structure": structure, **metadata}
        return self.call("rpc_backward", uid, flat, meta)

    def inference(self, uid: str, max_length: int, **metadata) -> InferenceStream:
        """Open an rpc_inference stream (the first step sends max_length etc., as Petals does)."""
        return InferenceStream(
            self, uid, {"max_length": max_length, "points": 0.0, "active_adapter": "", **metadata}
        )


class InferenceStream:
    """One rpc_inference session, as Petals' _ServerInferenceSession drives it."""

    def __init__(self, client: WireClient, uid: str, session_metadata: dict):
        self.client, self.uid, self.session_metadata = client, uid, session_metadata
        self.session_id = str(uuid.uuid4())
        self.stepped = False
        self._queue: asyncio.Queue | None = None
        self._outputs = None

    def _open(self) -> None:
        async def open_stream():
            self._queue = asyncio.Queue()

            async def requests():
                while True:
                    message = await self._queue.get()
                    yield message
                    if not message.uid and not message.tensors:
                        break

            self._outputs = await self.client.stub.rpc_inference(requests())

        self.client.run(open_stream())

    def send(self, tensors: Sequence[torch.Tensor], metadata: dict, *, uid: str | None = None) -> None:
        """Put one raw message on the stream (for tests of malformed input)."""
        from hivemind.compression import serialize_torch_tensor
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer

        if self._outputs is None:
            self._open()
        message = runtime_pb2.ExpertRequest(
            uid=self.uid if uid is None else uid,
            tensors=[serialize_torch_tensor(t) for t in tensors],
            metadata=MSGPackSerializer.dumps(metadata),
        )
        self.client.run(self._queue.put(message))

    def receive(self, timeout: float = 60.0) -> list[torch.Tensor]:
        """The next reply, decoded; raises the server's error (or StopAsyncIteration at the end)."""
        from hivemind.compression import deserialize_torch_tensor

        response = self.client.run(_next(self._outputs), timeout)
        return [deserialize_torch_tensor(t) for t in response.tensors]

    def step(
        self,
        hidden: torch.Tensor,
        prompts=DUMMY,
        hypo_ids=DUMMY_INT64,
        *,
        step_id: str | None = None,
        **extra,
    ):
        """One step: (hidden, prompts, hypo_ids) with session_id/step_id (+ session metadata at first)."""
        flat, structure = pack_args(hidden, prompts, hypo_ids)
        metadata = dict(session_id=self.session_id, step_id=step_id or str(uuid.uuid4()))
        if not self.stepped:
            metadata.update(self.session_metadata)
        metadata.update(extra, args_structure=structure)
        self.send(flat, metadata)
        self.stepped = True
        return self.receive()[0]

    def close(self) -> None:
        """Send the empty message that ends the session and wait for the stream to end."""
        from hivemind.proto import runtime_pb2

        if self._outputs is None:
            return
        with contextlib.suppress(Exception):
            self.client.run(self._queue.put(runtime_pb2.ExpertRequest()))
            with contextlib.suppress(StopAsyncIteration):
                self.client.run(_next(self._outputs), 10)
        self._outputs = None

    def __enter__(self) -> InferenceStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _next(iterator):
    return await anext(iterator)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2) -> bool:
    """Poll `predicate()` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
