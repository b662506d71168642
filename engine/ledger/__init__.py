"""Contribution ledger and earned priority: who did work for whom, and who goes first when a server is busy.

What is recorded (per peer id, the libp2p-authenticated identity of the other side):
- served: requests, tokens, tokens x blocks and compute seconds this node's server did for the peer
  (BlockHost's usage_fn);
- consumed: the same for work the peer's server did for this node's client (the client's hook,
  `Ledger.record_consumed`, called after each successful reply);
- probes: what this node verified about the peer's server (engine.ledger.verify.Auditor).

How a peer earns priority with this node — only from evidence this node checked itself:
(a) Direct reciprocity: work the peer's server did for us (tokens x blocks) becomes credit. The client
    dialed that peer id and libp2p authenticated it, so the credit reaches whoever did the work.
(b) Verified service to others: a peer that announces blocks we also host is probed now and then (an
    ordinary rpc_forward of random hidden states through one of those blocks), and its answer is compared
    with our own computation. While it keeps passing, its observed ONLINE time on those blocks earns credit
    (points per block-hour). A probe without an answer earns nothing and resets the clock; a wrong answer
    wipes the peer's credit and bars it from earning for `lie_penalty`. Servers of blocks we do not host
    cannot be checked, so they earn nothing through (b).
(c) Newcomers (and Petals clients, and free-riders) get the base priority 1.0. All credit decays with a
    half-life. Priority = 1 + credit / credit_scale; the compute queue delay is base_delay / priority seconds.
What a peer declares counts for nothing: the `points` field of Petals requests, the throughput and
`points` of its DHT record. We publish our own points in our record (`points` key), for display only.

Queue and bounded wait: the TaskPool orders tasks within a class (inference before forward/backward) by
arrival time + delay, which is aging — a task is only ever overtaken by tasks that arrive within its own
delay (at most base_delay) after it. A free-rider therefore waits, but at most base_delay plus the compute
time of the work already queued or arriving within that window: it is never starved.

Sybil resistance: credit comes only from work this node received or verified itself. Ten identities that
serve each other, or announce huge throughput, or declare points, earn nothing here: none of that is work
this node received, and a record is only a hint whom to probe. An identity that really serves our blocks
correctly does earn — that is service, whoever runs it.

Limits: a server may answer probes honestly and cheat ordinary clients (probes look like ordinary requests,
but come from known servers); a peer may relay probes to an honest server; a server's credit for (b) is
bounded by the blocks we can check, so a peer hosting other blocks is only credited through (a);
inference always goes before forward/backward, so aging bounds the wait within a class only.

Layers: priority.py (pure rules) -> accounts.py (records) -> store.py (the file) -> ledger.py (the
facade) -> verify.py (probes over the network).
"""

from engine.ledger.accounts import PeerContribution
from engine.ledger.ledger import LEDGER_FILE, Ledger, default_ledger_path
from engine.ledger.priority import LedgerPolicy
from engine.ledger.verify import Auditor

__all__ = ["LEDGER_FILE", "Auditor", "Ledger", "LedgerPolicy", "PeerContribution", "default_ledger_path"]
