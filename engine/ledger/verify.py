"""Auditor: checks other servers of the blocks we host, and credits the ONLINE time of those that pass.

Each round (every `period` seconds, on a daemon thread while our BlockHost serves): read the swarm from
the DHT; credit the time since the last round to every ONLINE server that overlaps our span and passed a
probe recently; then probe one such server (the one probed longest ago) — an ordinary Petals rpc_forward of
random hidden states through one block we host — and compare its answer with our own computation. Our own
hosting time is recorded too (for our informational points).

A DHT record only says whom to probe: anyone can write any record, so records earn nothing by themselves.
The probed peer id is the one libp2p dialed and authenticated, so the credit goes to whoever answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.ledger.ledger import Ledger
from engine.swarm.records import ServerState

logger = logging.getLogger(__name__)


def judge_probe(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> str:
    """ "passed" if `theirs` matches our output within `tolerance` (relative L2 error), else "wrong".

    The tolerance leaves room for other dtypes and quantization (int8, nf4) on the peer's side; a server
    with other weights, or one that returns noise, is off by about 100%.
    """
    if tuple(theirs.shape) != tuple(ours.shape):
        return "wrong"
    theirs, ours = theirs.float(), ours.float()
    if not bool(torch.isfinite(theirs).all()):
        return "wrong"
    error = float((theirs - ours).norm() / ours.norm().clamp_min(1e-6))
    return "passed" if error <= tolerance else "wrong"


@dataclass
class RoundReport:
    """What one audit round did (for logs and tests)."""

    probed: str | None = None
    block: int | None = None
    outcome: str | None = None
    credited: dict[str, float] = field(default_factory=dict)


class Auditor:
    """Probes the servers that overlap `host`'s span and feeds the results to `ledger` (see module doc).

    `host` is a BlockHost (its dht, info() and run_local_forward() are used). Cheap to construct; `start()`
    runs rounds in the background, `run_round()` runs one now, `stop()` ends it all.
    """

    def __init__(
        self,
        ledger: Ledger,
        host,
        *,
        period: float = 60.0,
        probe_tokens: int = 4,
        tolerance: float = 0.1,
        probe_timeout: float = 30.0,
    ):
        self.ledger, self.host = ledger, host
        self.period, self.probe_tokens = period, probe_tokens
        self.tolerance, self.probe_timeout = tolerance, probe_timeout
        self._random = random.Random(os.urandom(8))
        self._last_round: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._p2p = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run an audit round every `period` seconds on a daemon thread."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stopping.wait(self.period):
                try:
                    self.run_round()
                except Exception:
                    logger.warning("ledger audit round failed", exc_info=True)

        self._thread = threading.Thread(target=loop, name="pollinate-ledger-audit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the rounds and close our connection to the p2p daemon."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.probe_timeout + 10)
            self._thread = None
        if self._loop is not None:
            if self._p2p is not None:
                try:
                    self._call(self._p2p.shutdown(), 10)
                except Exception:
                    logger.debug("closing the auditor's p2p replica failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
            self._loop.close()
            self._loop = self._loop_thread = self._p2p = None

    # --- one round ----------------------------------------------------------------------------------------

    def run_round(self) -> RoundReport:
        """Record our hosting time, credit verified servers' ONLINE time, probe one server."""
        from engine.server.block_host import HostState
        from engine.swarm.discovery import fetch_snapshot

        report = RoundReport()
        info = self.host.info()
        now = time.monotonic()
        if info.state != HostState.SERVING or info.start_block is None:
            self._last_round = None
            return report
        start, end = info.start_block, info.end_block
        if self._last_round is not None:
            self.ledger.record_hosting(end - start, min(now - self._last_round, 2 * self.period))
        self._last_round = now
        if info.peer_id:
            self.ledger.set_self(info.peer_id)

        snapshot = fetch_snapshot(self.host.dht, info.dht_prefix, info.total_blocks)
        overlaps: dict[str, tuple[int, int]] = {}
        for span in snapshot.spans(ServerState.ONLINE):
            low, high = max(span.start, start), min(span.end, end)
            if span.peer_id != info.peer_id and low < high:
                overlaps[span.peer_id] = (low, high)
        for peer_id, (low, high) in overlaps.items():
            points = self.ledger.record_online(peer_id, high - low)
            if points:
                report.credited[peer_id] = points
        if not overlaps:
            return report

        # The server probed longest ago (never probed first), in random order among equals.
        candidates = list(overlaps)
        self._random.shuffle(candidates)
        target = min(candidates, key=self.ledger.last_probe_at)
        low, high = overlaps[target]
        report.probed, report.block = target, self._random.randrange(low, high)
        report.outcome = self.probe(target, report.block, info)
        self.ledger.record_probe(target, report.outcome)
        logger.info("probed %s on block %d: %s", target[-6:], report.block, report.outcome)
        return report

    def probe(self, peer_id: str, block: int, info) -> str:
        """Send random hidden states through `block` on `peer_id` and judge its answer against ours."""
        dtype = getattr(torch, info.dtype or "float32")
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        hidden = torch.randn(1, self.probe_tokens, info.hidden_size, generator=generator).to(dtype)
        uid = f"{info.dht_prefix}.{block}"
        try:
            theirs = self._call(self._remote_forward(peer_id, uid, hidden), self.probe_timeout + 5)
        except Exception as error:
            logger.debug("probe of %s failed: %r", peer_id, error)
            return "failed"
        ours = self.host.run_local_forward(block, block + 1, hidden, timeout=self.probe_timeout)
        return judge_probe(ours, theirs, self.tolerance)

    # --- p2p ----------------------------------------------------------------------------------------------

    def _call(self, coroutine, timeout: float):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, name="pollinate-ledger-p2p", daemon=True
            )
            self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _remote_forward(self, peer_id: str, uid: str, hidden: torch.Tensor) -> torch.Tensor:
        # Exactly what a Petals client sends for rpc_forward, so a probe looks like any other request.
        from hivemind import DHT
        from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
        from hivemind.p2p import P2P, PeerID
        from hivemind.proto import runtime_pb2
        from hivemind.utils import MSGPackSerializer

        from engine.server.handler import TransformerConnectionHandler

        if self._p2p is None:
            maddr = await asyncio.get_running_loop().run_in_executor(
                None, self.host.dht.run_coroutine, DHT._get_p2p_daemon_listen_maddr
            )
            self._p2p = await P2P.replicate(maddr)
        prompts = torch.empty(0)
        metadata = {"points": 0.0, "active_adapter": "", "args_structure": ((b"__T0", b"__T1"), {})}
        request = runtime_pb2.ExpertRequest(
            uid=uid,
            tensors=[serialize_torch_tensor(hidden), serialize_torch_tensor(prompts)],
            metadata=MSGPackSerializer.dumps(metadata),
        )
        stub = TransformerConnectionHandler.get_stub(self._p2p, PeerID.from_base58(peer_id))
        response = await asyncio.wait_for(stub.rpc_forward(request), self.probe_timeout)
        if not response.tensors:
            raise ValueError("the probe reply has no tensors")
        return deserialize_torch_tensor(response.tensors[0])
