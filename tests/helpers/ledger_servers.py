"""Test helpers for the ledger: a block server wired to a Ledger, and a caller that speaks as a given peer.

`ledger_server` is `tests.helpers.servers.running_server` with the ledger's hooks; `PeerCaller` sends
Petals-format rpc_forward requests either from a fresh identity (a free-rider, a Sybil) or from the
identity of an existing DHT peer (a contributor's node, whose server and client share one peer id).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from engine.ledger.ledger import Ledger
from engine.server.block_host import BlockHost
from engine.server.config import ServerConfig


@contextlib.contextmanager
def ledger_server(
    model: str | Path, initial_peers: Sequence[str], ledger: Ledger, **config_fields
) -> Iterator[BlockHost]:
    """A started in-process BlockHost whose queue order, usage and announced points come from `ledger`."""
    config_fields.setdefault("host", "127.0.0.1")
    config_fields.setdefault("throughput", 1.0)
    config_fields.setdefault("device", "cpu")
    config_fields.setdefault("update_period", 10.0)
    config = ServerConfig(model=str(model), initial_peers=tuple(initial_peers), **config_fields)
    host = BlockHost(config, **ledger.host_hooks())
    try:
        host.start()
        ledger.set_self(host.info().peer_id)
        yield host
    finally:
        host.stop()


class PeerCaller:
    """Calls block servers' rpc_forward as one peer identity, on a private event loop (blocking API).

    `PeerCaller()` is a fresh identity; `PeerCaller(dht=...)` speaks as that DHT's peer (its p2p daemon).
    """

    def __init__(self, *, dht=None):
        from hivemind.p2p import P2P

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        if dht is None:
            self.p2p = self.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        else:
            from hivemind import DHT

            maddr = dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr)
            self.p2p = self.run(P2P.replicate(maddr))
        self.peer_id = self.p2p.peer_id.to_base58()

    def run(self, coroutine, timeout: float = 60.0):
        """Run a coroutine on the caller's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self, coroutine):
        """Start a coroutine on the caller's loop; returns a concurrent Future of its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def connect(self, maddrs: Sequence[str]) -> None:
        """Dial a server by its multiaddrs (".../p2p/<peer id>")."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        peer_id = PeerID.from_base58(str(maddrs[0]).rsplit("/p2p/", 1)[1])
        addresses = [Multiaddr(str(m).rsplit("/p2p/", 1)[0]) for m in maddrs]
        self.run(self.p2p._client.connect(peer_id, addresses))

    async def forward(
        self, peer_id: str, uid: str, hidden: torch.Tensor, points: float = 0.0
    ) -> torch.Tensor:
        """One Petals-format rpc_forward; declares `points` in its metadata like a Petals client."""
        from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
        from hivemind.p2p import PeerID
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer

        from engine.server.handler import TransformerConnectionHandler

        metadata = {"points": points, "active_adapter": "", "args_structure": ((b"__T0", b"__T1"), {})}
        request = runtime_pb2.ExpertRequest(
            uid=uid,
            tensors=[serialize_torch_tensor(hidden), serialize_torch_tensor(torch.empty(0))],
            metadata=MSGPackSerializer.dumps(metadata),
        )
        stub = TransformerConnectionHandler.get_stub(self.p2p, PeerID.from_base58(peer_id))
        response = await stub.rpc_forward(request)
        return deserialize_torch_tensor(response.tensors[0])

    async def timed_forward(self, peer_id: str, uid: str, hidden: torch.Tensor, points: float = 0.0) -> float:
        """Seconds from sending one rpc_forward to its reply."""
        started = time.perf_counter()
        await self.forward(peer_id, uid, hidden, points)
        return time.perf_counter() - started

    def close(self) -> None:
        """Close our p2p (a replica leaves the shared daemon running) and the loop."""
        with contextlib.suppress(Exception):
            self.run(self.p2p.shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> PeerCaller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
