"""Can other peers dial this one? A dial-back check over the swarm, wire-compatible with Petals'.

Petals servers serve a small `ReachabilityProtocol.rpc_check` RPC: peer A asks peer B "can you reach C?";
B dials C from a separate, stripped libp2p peer (its *probe*: no listening, no relay, no open connection to
C), so only a fresh direct connection counts. A peer asks a few others to check it and calls itself
reachable when at least half of those that answered could dial it. Behind NAT, hivemind's `use_auto_relay`
lets the p2p daemon find a libp2p relay and announce `/p2p-circuit` addresses: clients then reach the server
through the relay (slower). We use those facilities of hivemind; nothing here traverses NAT by hand.

`reachability_verdict` and `reachability_advice` are pure; `ReachabilityService` is the I/O around them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import uvloop
from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import dht_pb2

logger = logging.getLogger(__name__)

STATES = ("reachable", "relayed", "unreachable", "unknown")
CHECK_TIMEOUT = 5.0  # per dial-back; a helper that checks a third peer gets twice this
MAX_HELPERS = 5
THRESHOLD = 0.5
# The probe only dials out (like Petals' STRIPPED_PROBE_ARGS): no listening, no relays, no NAT services.
_PROBE_OPTIONS = dict(
    dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True, startup_timeout=60
)


@dataclasses.dataclass(frozen=True)
class Reachability:
    """The result of a dial-back check, as /api/status and the health view report it."""

    state: str  # one of STATES
    helpers_asked: int = 0
    helpers_answered: int = 0
    dialled_back: int = 0
    port: int | None = None
    advice: str | None = None  # the one thing the user can do, when there is one
    checked_at: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reachability_verdict(
    dialled_back: int, answered: int, *, relayed: bool, threshold: float = THRESHOLD
) -> str:
    """ "reachable" when enough helpers dialled us directly; else "relayed" if a relay carries us, else
    "unreachable"; "unknown" when no helper answered (a new swarm, or peers that do not serve the check)."""
    if answered <= 0:
        return "relayed" if relayed else "unknown"
    if dialled_back / answered >= threshold:
        return "reachable"
    return "relayed" if relayed else "unreachable"


def reachability_advice(state: str, port: int | None) -> str | None:
    """What the user can do about it, in one sentence (None when nothing needs doing)."""
    where = f"TCP port {port}" if port else "Pollinate's port"
    if state == "unreachable":
        return (
            "Other peers cannot connect to this computer, so nobody can use the blocks it hosts: "
            f"forward {where} from your router to this computer (and allow it through the firewall)."
        )
    if state == "relayed":
        return (
            "Peers reach this computer only through a relay, which is slower: "
            f"forward {where} from your router to this computer to be reached directly."
        )
    return None


def listening_port(maddrs) -> int | None:
    """The TCP port of the first non-relay address (what a router must forward)."""
    for maddr in maddrs:
        text = str(maddr)
        if "/p2p-circuit" in text:
            continue
        parts = text.split("/")
        if "tcp" in parts and parts.index("tcp") + 1 < len(parts):
            port = parts[parts.index("tcp") + 1]
            if port.isdigit() and int(port) > 0:
                return int(port)
    return None


def has_relay_address(maddrs) -> bool:
    """Whether the daemon announces an address through a libp2p relay."""
    return any("/p2p-circuit" in str(maddr) for maddr in maddrs)


class ReachabilityProtocol(ServicerBase):
    """The `rpc_check` RPC. The class name is part of the wire protocol (hivemind names handlers
    "{class}.{method}"): Petals peers and ours can ask each other."""

    def __init__(self, probe_factory=None, wait_timeout: float = CHECK_TIMEOUT):
        self._probe_factory = probe_factory
        self._probe: P2P | None = None
        self._probe_lock = asyncio.Lock()
        self.wait_timeout = wait_timeout

    async def _get_probe(self) -> P2P | None:
        async with self._probe_lock:
            if self._probe is None and self._probe_factory is not None:
                self._probe = await self._probe_factory()
            return self._probe

    async def call_check(self, p2p: P2P, remote_peer: PeerID, *, check_peer: PeerID) -> bool | None:
        """Ask `remote_peer` (through `p2p`) whether it can dial `check_peer`; None if it did not answer."""
        request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=check_peer.to_bytes()))
        timeout = self.wait_timeout if check_peer == remote_peer else self.wait_timeout * 2
        try:
            response = await self.get_stub(p2p, remote_peer).rpc_check(request, timeout=timeout)
        except Exception as exc:  # no such handler, timeout, refused: all mean "no answer"
            logger.debug("reachability check by %s of %s got no answer: %r", remote_peer, check_peer, exc)
            return None
        return bool(response.available)

    async def rpc_check(self, request: dht_pb2.PingRequest, context: P2PContext) -> dht_pb2.PingResponse:
        """Dial the peer named in the request from our probe (a fresh connection), or answer for ourselves."""
        response = dht_pb2.PingResponse(available=True)
        try:
            check_peer = PeerID(request.peer.node_id)
        except Exception:
            response.available = False
            return response
        if check_peer != context.local_id:
            probe = await self._get_probe()
            reached = (
                None if probe is None else await self.call_check(probe, check_peer, check_peer=check_peer)
            )
            response.available = reached is True
        return response

    async def close(self) -> None:
        if self._probe is not None:
            await self._probe.shutdown()
            self._probe = None


class ReachabilityService:
    """Serves `rpc_check` for other peers on a DHT's p2p daemon and checks this peer's own reachability.

    Runs its own event loop thread. The probe peer starts on the first check another peer asks for.
    """

    def __init__(self, dht: DHT):
        self.dht = dht
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._p2p: P2P | None = None
        self._protocol: ReachabilityProtocol | None = None

    def start(self) -> ReachabilityService:
        # uvloop, not asyncio's default loop: the probe starts a p2p daemon subprocess, and asyncio's loop
        # asks the global policy for a child watcher, which raises NotImplementedError once hivemind's client
        # code has switched the process to uvloop's policy (after the first chat through this process).
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pollinate-reachability", daemon=True
        )
        self._thread.start()
        daemon_maddr = self.dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr)
        self._run(self._serve(daemon_maddr), timeout=60)
        return self

    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _serve(self, daemon_maddr) -> None:
        self._p2p = await P2P.replicate(daemon_maddr)
        self._protocol = ReachabilityProtocol(probe_factory=self._make_probe)
        await self._protocol.add_p2p_handlers(self._p2p)

    async def _make_probe(self) -> P2P:
        # The probe must find others through the p2p daemons' own DHT: bootstrap it from every peer we know.
        peers = [str(addr) for addr in await self._p2p.get_visible_maddrs()]
        for info in await self._p2p.list_peers():
            peers.extend(f"{addr}/p2p/{info.peer_id}" for addr in info.addrs)
        return await P2P.create(initial_peers=peers, **_PROBE_OPTIONS)

    def check(self, max_helpers: int = MAX_HELPERS) -> Reachability:
        """Ask up to `max_helpers` peers of the routing table to dial us back; blocks for up to ~10 s each."""
        helpers = self.dht.run_coroutine(_routing_table_peers)
        own_id = self.dht.peer_id
        asked = answered = dialled = 0
        for helper in helpers:
            if helper == own_id:
                continue
            asked += 1
            reached = self._run(
                self._protocol.call_check(self._p2p, helper, check_peer=own_id), timeout=CHECK_TIMEOUT * 3
            )
            if reached is not None:
                answered += 1
                dialled += int(reached)
            if answered >= max_helpers:
                break
        maddrs = self._run(_visible_maddrs(self._p2p), timeout=30)
        state = reachability_verdict(dialled, answered, relayed=has_relay_address(maddrs))
        port = listening_port(maddrs)
        logger.info("reachability: %s (%d of %d helpers dialled back)", state, dialled, answered)
        return Reachability(state, asked, answered, dialled, port, reachability_advice(state, port))

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            if self._protocol is not None and self._p2p is not None:
                await self._protocol.remove_p2p_handlers(self._p2p)
            if self._protocol is not None:
                await self._protocol.close()
            if self._p2p is not None:
                await self._p2p.shutdown()

        try:
            # Short: when the whole process group got SIGTERM the daemon is gone and nothing will answer.
            self._run(close(), timeout=3)
        except Exception:
            logger.debug("while stopping the reachability service", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(3)
        self._loop.close()
        self._loop = self._thread = None


async def _visible_maddrs(p2p: P2P) -> list:
    try:
        return list(await p2p.get_visible_maddrs(latest=True))
    except ValueError:  # hivemind: "No multiaddrs found for peer" (a peer that does not listen)
        return []


async def _routing_table_peers(_dht: DHT, node) -> list[PeerID]:
    return list(node.protocol.routing_table.peer_id_to_uid.keys())
