"""Ledger: the thread-safe facade over the accounts, the priority rules and the ledger file.

Its methods are shaped to plug straight into the other parts: `priority_delay` is a BlockHost
priority_fn, `record_served` a usage_fn, `points` a points_fn (see `host_hooks()`); `record_consumed` is the
client's hook; `record_probe`/`record_online` are the Auditor's; `summary()` and `contributions()` feed the
API's /api/stats and /api/swarm.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.stores import open_store
from engine.ledger import store
from engine.ledger.accounts import Decaying, PeerAccount, PeerContribution, Usage
from engine.ledger.priority import (
    LedgerPolicy,
    eviction_order,
    online_points,
    priority_of,
    queue_delay,
    work_points,
)

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"


def default_ledger_path(data_dir: Path | None = None) -> Path:
    """Where the engine keeps its ledger: `data_dir` (default: engine.paths.data_dir()) / ledger.json."""
    from engine import paths

    return Path(data_dir if data_dir is not None else paths.data_dir()) / LEDGER_FILE


class Ledger:
    """What this node served and consumed, per peer, and the priority each peer earned here.

    Cheap to construct (in memory, no file); `Ledger.open(path)` loads a saved one. `clock` returns wall
    time in seconds (tests pass their own).
    """

    def __init__(
        self,
        policy: LedgerPolicy | None = None,
        *,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.policy = policy or LedgerPolicy()
        self.path = Path(path) if path is not None else None
        self.clock = clock
        # This node's peer ids: its client's and each of its servers' (each DHT peer has its own id).
        self.self_ids: set[str] = set()
        self._lock = threading.RLock()
        self._accounts: dict[str, PeerAccount] = {}
        self._served = Usage()  # totals over all peers (evicted ones included)
        self._consumed = Usage()
        self._points = Decaying()  # our own earned points (informational: others decide what we get)
        self._hosted_block_seconds = 0.0
        self._dirty = False
        self._autosave: threading.Thread | None = None
        self._closing = threading.Event()

    # --- persistence ---------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path, policy: LedgerPolicy | None = None, *, clock: Callable[[], float] = time.time
    ) -> Ledger:
        """Load the ledger saved at `path` (a new one if there is none).

        A damaged file (bad JSON, nested too deeply, a folder, bad values) is renamed to
        `*.corrupt-<timestamp>`, recorded for the app to tell the user (contract.stores), and the ledger
        starts clean, with a warning.
        """

        def opener(where: Path) -> Ledger:
            ledger = cls(policy, path=where, clock=clock)
            body = store.load(where)
            if body is not None:
                ledger._restore(body)
            return ledger

        ledger, aside = open_store(
            Path(path), opener, store="contribution ledger (points)", notices=Path(path).parent
        )
        if aside is not None:
            logger.warning(
                "the contribution ledger %s was damaged (%s): set aside as %s, starting clean",
                path,
                aside.reason,
                Path(aside.moved_to).name,
            )
        return ledger

    def save(self) -> None:
        """Write the ledger to its file now (atomically); a ledger without a path is kept in memory only."""
        if self.path is None:
            return
        with self._lock:
            body = self._body()
            self._dirty = False
        try:
            store.save(self.path, body)
        except OSError:
            with self._lock:
                self._dirty = True
            logger.warning("could not save the contribution ledger to %s", self.path, exc_info=True)

    def start_autosave(self, period: float = 30.0) -> None:
        """Save every `period` seconds when something changed (daemon thread), until close()."""
        if self._autosave is not None or self.path is None:
            return

        def loop() -> None:
            while not self._closing.wait(period):
                if self._dirty:
                    self.save()

        self._autosave = threading.Thread(target=loop, name="pollinate-ledger-save", daemon=True)
        self._autosave.start()

    def close(self) -> None:
        """Stop autosaving and save a last time."""
        self._closing.set()
        if self._autosave is not None:
            self._autosave.join(10)
            self._autosave = None
        self.save()

    def _body(self) -> dict[str, Any]:
        return {
            "saved_at": self.clock(),
            "served": vars(self._served).copy(),
            "consumed": vars(self._consumed).copy(),
            "points": vars(self._points).copy(),
            "hosted_block_seconds": self._hosted_block_seconds,
            "accounts": [account.to_dict() for account in self._accounts.values()],
        }

    def _restore(self, body: dict[str, Any]) -> None:
        accounts = body.get("accounts", [])
        if not isinstance(accounts, list):
            raise ValueError("ledger accounts must be a list")
        parsed = [PeerAccount.from_dict(raw) for raw in accounts]
        hosted = body.get("hosted_block_seconds", 0.0)
        if isinstance(hosted, bool) or not isinstance(hosted, int | float) or hosted < 0:
            raise ValueError("ledger hosted_block_seconds must be a non-negative number")
        with self._lock:
            self._served = Usage.from_dict(body.get("served", {}))
            self._consumed = Usage.from_dict(body.get("consumed", {}))
            self._points = Decaying.from_dict(body.get("points", {}))
            self._hosted_block_seconds = float(hosted)
            self._accounts = {account.peer_id: account for account in parsed}
            self._evict_if_full(self.clock())

    def _clear(self) -> None:
        with self._lock:
            self._accounts.clear()
            self._served, self._consumed, self._points = Usage(), Usage(), Decaying()
            self._hosted_block_seconds = 0.0

    # --- recording -----------------------------------------------------------------------------------------

    def set_self(self, peer_id: str) -> None:
        """Add one of our own peer ids: work for ourselves earns no points, and our own requests go first."""
        self.self_ids.add(peer_id)

    def record_served(self, peer_id: str, kind: Any, tokens: int, blocks: int, seconds: float) -> None:
        """This node's server computed `tokens` x `blocks` for `peer_id` (a BlockHost usage_fn)."""
        if not peer_id or peer_id in self.self_ids:
            return
        now = self.clock()
        half_life = self.policy.half_life
        with self._lock:
            account = self._account(peer_id, now)
            account.served.add(tokens, blocks, seconds)
            points = work_points(max(0, tokens) * max(0, blocks), self.policy)
            account.served_points.add(points, now, half_life)
            self._served.add(tokens, blocks, seconds)
            self._points.add(points, now, half_life)
            self._dirty = True

    def record_consumed(
        self, peer_id: str, tokens: int, blocks: int, seconds: float = 0.0, requests: int = 1
    ) -> None:
        """The server `peer_id` computed `tokens` x `blocks` for this node's client (the client's hook).

        Call it once per successful reply from that server, with the peer id the client dialed (libp2p
        authenticated it), so the work counts as direct reciprocity when that peer asks us for work.
        """
        if not peer_id or peer_id in self.self_ids:
            return
        now = self.clock()
        with self._lock:
            account = self._account(peer_id, now)
            account.consumed.add(tokens, blocks, seconds, requests)
            account.work_credit.add(
                work_points(max(0, tokens) * max(0, blocks), self.policy), now, self.policy.half_life
            )
            self._consumed.add(tokens, blocks, seconds, requests)
            self._dirty = True

    def record_probe(self, peer_id: str, outcome: str) -> None:
        """A probe of `peer_id`'s server ended: "passed", "failed" (no usable answer) or "wrong" (a lie).

        A wrong answer wipes the peer's credit and bans it from earning for `policy.lie_penalty` seconds.
        """
        if outcome not in ("passed", "failed", "wrong"):
            raise ValueError(f"probe outcome must be passed, failed or wrong, got {outcome!r}")
        now = self.clock()
        with self._lock:
            account = self._account(peer_id, now)
            probes = account.probes
            probes.last_probe_at = now
            if outcome == "passed":
                probes.passed += 1
                probes.last_pass_at = now
            elif outcome == "failed":
                probes.failed += 1
                probes.last_pass_at = 0.0  # must pass again before its ONLINE time counts
            else:
                probes.wrong += 1
                probes.last_pass_at = 0.0
                probes.banned_until = now + self.policy.lie_penalty
                account.work_credit, account.online_credit = Decaying(), Decaying()
            self._dirty = True

    def is_verified(self, peer_id: str) -> bool:
        """True if `peer_id` passed a probe within `policy.verified_for` seconds and is not banned."""
        now = self.clock()
        with self._lock:
            account = self._accounts.get(peer_id)
            if account is None or account.probes.banned_until > now or not account.probes.last_pass_at:
                return False
            return now - account.probes.last_pass_at <= self.policy.verified_for

    def record_online(self, peer_id: str, blocks: int) -> float:
        """`peer_id` was seen ONLINE on `blocks` blocks we can check: credit the time since the last sighting.

        Only verified peers earn (see is_verified); returns the points credited.
        """
        if not self.is_verified(peer_id):
            return 0.0
        now = self.clock()
        with self._lock:
            account = self._accounts[peer_id]
            probes = account.probes
            since = max(probes.last_online_at, probes.last_pass_at)
            probes.last_online_at = now
            seconds = min(max(0.0, now - since), self.policy.max_online_gap)
            points = online_points(seconds, blocks, self.policy)
            probes.online_seconds += seconds
            account.online_credit.add(points, now, self.policy.half_life)
            self._dirty = True
            return points

    def record_hosting(self, blocks: int, seconds: float) -> None:
        """This node hosted `blocks` blocks for `seconds` (counts toward our own, informational points)."""
        now = self.clock()
        with self._lock:
            self._hosted_block_seconds += max(0, blocks) * max(0.0, seconds)
            self._points.add(online_points(seconds, blocks, self.policy), now, self.policy.half_life)
            self._dirty = True

    def _account(self, peer_id: str, now: float) -> PeerAccount:
        account = self._accounts.get(peer_id)
        if account is None:
            self._evict_if_full(now, room_for=1)
            account = self._accounts[peer_id] = PeerAccount(peer_id, first_seen=now, last_seen=now)
        account.last_seen = now
        return account

    def _evict_if_full(self, now: float, room_for: int = 0) -> None:
        limit = self.policy.max_peers - room_for
        if len(self._accounts) <= limit:
            return
        # Evict a tenth more than needed, so a full ledger does not sort itself on every new peer.
        excess = len(self._accounts) - limit + max(0, min(limit, self.policy.max_peers // 10))
        values = ((a.peer_id, self._retention_value(a, now), a.last_seen) for a in self._accounts.values())
        for peer_id in eviction_order(values)[:excess]:
            del self._accounts[peer_id]

    def _retention_value(self, account: PeerAccount, now: float) -> float:
        if account.probes.banned_until > now:
            return float("inf")  # a liar is kept, so that it cannot wipe its record by being evicted
        half_life = self.policy.half_life
        return account.credit(now, half_life) + account.served_points.at(now, half_life)

    # --- reading -------------------------------------------------------------------------------------------

    def credit_of(self, peer_id: str) -> float:
        """The points `peer_id` has earned with this node now (decayed; zero for strangers and liars)."""
        now = self.clock()
        with self._lock:
            account = self._accounts.get(peer_id)
            return account.credit(now, self.policy.half_life) if account is not None else 0.0

    def last_probe_at(self, peer_id: str) -> float:
        """When this node last probed `peer_id`'s server (0.0 if never)."""
        with self._lock:
            account = self._accounts.get(peer_id)
            return account.probes.last_probe_at if account is not None else 0.0

    def priority_of(self, peer_id: str) -> float:
        """The priority `peer_id` gets here: 1.0 for a newcomer, higher for peers that earned credit."""
        return priority_of(self.credit_of(peer_id), self.policy)

    def priority_delay(self, peer_id: str, kind: Any = None, points: float = 0.0) -> float:
        """The compute-queue delay (seconds, lower = sooner) for a request of `peer_id` (a priority_fn).

        `points` is what the peer declared in its request metadata: ignored, since anyone can declare
        anything. Our own requests get no delay.
        """
        if peer_id and peer_id in self.self_ids:
            return 0.0
        return queue_delay(self.priority_of(peer_id), self.policy)

    def points(self) -> float:
        """Points this node earned by serving others and hosting, decayed (published in our DHT record)."""
        with self._lock:
            return self._points.at(self.clock(), self.policy.half_life)

    def host_hooks(self) -> dict[str, Callable]:
        """Keyword arguments for BlockHost: priority_fn, usage_fn and points_fn bound to this ledger."""
        return dict(priority_fn=self.priority_delay, usage_fn=self.record_served, points_fn=self.points)

    def contribution(self, peer_id: str) -> PeerContribution | None:
        """What this node observed of one peer (None if it never met it)."""
        now = self.clock()
        with self._lock:
            account = self._accounts.get(peer_id)
            return self._contribution(account, now) if account is not None else None

    def contributions(self, limit: int | None = None) -> list[PeerContribution]:
        """Every known peer's observed contribution, highest credit first (for the swarm view)."""
        now = self.clock()
        with self._lock:
            views = [self._contribution(account, now) for account in self._accounts.values()]
        views.sort(key=lambda view: (-view.credit, -view.last_seen, view.peer_id))
        return views if limit is None else views[:limit]

    def _contribution(self, account: PeerAccount, now: float) -> PeerContribution:
        credit = account.credit(now, self.policy.half_life)
        return PeerContribution(
            peer_id=account.peer_id,
            credit=credit,
            priority=priority_of(credit, self.policy),
            consumed_token_blocks=account.consumed.token_blocks,
            served_token_blocks=account.served.token_blocks,
            verified_online_seconds=account.probes.online_seconds,
            probes_passed=account.probes.passed,
            probes_failed=account.probes.failed,
            probes_wrong=account.probes.wrong,
            banned=account.probes.banned_until > now,
            last_seen=account.last_seen,
        )

    def summary(self) -> dict[str, Any]:
        """This node's contribution as it sees itself, for /api/stats.

        `priority` is what a peer that verified all of our work would give us (1.0 = newcomer); each peer
        decides for itself from what it observed, so this is an estimate, not a promise.
        """
        now = self.clock()
        with self._lock:
            points = self._points.at(now, self.policy.half_life)
            return dict(
                points=points,
                priority=priority_of(points, self.policy),
                served_requests=self._served.requests,
                served_tokens=self._served.tokens,
                served_token_blocks=self._served.token_blocks,
                served_compute_seconds=self._served.compute_seconds,
                consumed_requests=self._consumed.requests,
                consumed_tokens=self._consumed.tokens,
                consumed_token_blocks=self._consumed.token_blocks,
                hosted_block_hours=self._hosted_block_seconds / 3600.0,
                peers_known=len(self._accounts),
            )
