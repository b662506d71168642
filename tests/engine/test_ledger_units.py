"""Pure tests of the contribution ledger: priority, decay, probes, eviction, the file, the aging queue."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time

import pytest
import torch

from engine.ledger import Ledger, LedgerPolicy
from engine.ledger.priority import decayed, eviction_order, priority_of, queue_delay
from engine.ledger.verify import judge_probe
from engine.server.task_pool import TaskKind, TaskPool

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_ledger(**policy) -> tuple[Ledger, Clock]:
    clock = Clock()
    return Ledger(LedgerPolicy(**policy), clock=clock), clock


# --- priority rules ---


def test_newcomer_gets_base_priority_and_declared_points_are_ignored():
    ledger, _ = make_ledger(base_delay=2.0)
    assert ledger.priority_of("stranger") == 1.0
    assert ledger.priority_delay("stranger", TaskKind.INFERENCE, 0.0) == 2.0
    # A Petals client sends `points`; whatever it declares, its place in the queue does not change.
    assert ledger.priority_delay("stranger", TaskKind.FORWARD, 1e12) == 2.0
    assert ledger.credit_of("stranger") == 0.0


def test_work_received_from_a_peer_earns_it_priority():
    ledger, _ = make_ledger(base_delay=1.0, credit_scale=10.0, token_blocks_per_point=1000.0)
    ledger.record_consumed("contributor", tokens=5000, blocks=2, seconds=3.0)  # 10_000 token-blocks
    assert ledger.credit_of("contributor") == pytest.approx(10.0)
    assert ledger.priority_of("contributor") == pytest.approx(2.0)
    assert ledger.priority_delay("contributor") == pytest.approx(0.5)
    assert ledger.priority_delay("contributor") < ledger.priority_delay("free-rider")


def test_serving_a_peer_earns_us_points_not_the_peer():
    ledger, _ = make_ledger()
    ledger.record_served("client", TaskKind.INFERENCE, tokens=1000, blocks=4, seconds=0.5)
    assert ledger.credit_of("client") == 0.0
    assert ledger.points() == pytest.approx(4.0)
    summary = ledger.summary()
    assert summary["served_token_blocks"] == 4000 and summary["served_requests"] == 1
    assert summary["priority"] == pytest.approx(priority_of(4.0, ledger.policy))
    view = ledger.contribution("client")
    assert view.served_token_blocks == 4000 and view.consumed_token_blocks == 0 and view.priority == 1.0


def test_our_own_requests_go_first_and_earn_nothing():
    ledger, _ = make_ledger()
    ledger.set_self("me")
    ledger.record_served("me", TaskKind.FORWARD, 100, 2, 0.1)
    ledger.record_consumed("me", 100, 2)
    assert ledger.priority_delay("me") == 0.0
    assert ledger.points() == 0.0 and ledger.contributions() == []


def test_credit_decays_with_the_half_life():
    ledger, clock = make_ledger(half_life=HOUR)
    ledger.record_consumed("peer", tokens=1000, blocks=8)
    clock.now += HOUR
    assert ledger.credit_of("peer") == pytest.approx(4.0)
    clock.now += 2 * HOUR
    assert ledger.credit_of("peer") == pytest.approx(1.0)
    ledger.record_consumed("peer", tokens=1000, blocks=1)  # new work adds to the decayed amount
    assert ledger.credit_of("peer") == pytest.approx(2.0)
    assert decayed(8.0, 0.0, 10.0, 10.0) == pytest.approx(4.0)
    assert decayed(8.0, 10.0, 0.0, 10.0) == 8.0  # a clock going back never grows credit


def test_priority_and_delay_are_monotonic_and_bounded():
    policy = LedgerPolicy(base_delay=1.5, credit_scale=5.0)
    delays = [queue_delay(priority_of(credit, policy), policy) for credit in (0, 1, 5, 50, 1e9)]
    assert delays[0] == 1.5
    assert all(a > b > 0 for a, b in itertools.pairwise(delays))
    assert queue_delay(priority_of(-100.0, policy), policy) == 1.5  # never worse than a newcomer


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        LedgerPolicy(base_delay=0)
    with pytest.raises(ValueError):
        LedgerPolicy(half_life=float("nan"))
    with pytest.raises(ValueError):
        LedgerPolicy(max_peers=0)


# --- probes ---


def test_verified_online_time_earns_credit_only_while_probes_pass():
    ledger, clock = make_ledger(
        points_per_block_hour=1.0, max_online_gap=HOUR, verified_for=2 * HOUR, half_life=1e12
    )
    assert ledger.record_online("server", blocks=4) == 0.0  # announced but never checked: nothing
    ledger.record_probe("server", "passed")
    clock.now += HOUR / 2
    assert ledger.record_online("server", blocks=4) == pytest.approx(2.0)
    clock.now += 10 * HOUR  # a long silence: the gap is capped, and the pass is too old to vouch for it
    assert ledger.record_online("server", blocks=4) == 0.0
    ledger.record_probe("server", "passed")
    clock.now += 5 * HOUR / 4
    assert ledger.record_online("server", blocks=4) == pytest.approx(4.0)  # gap capped at one hour
    ledger.record_probe("server", "failed")  # no answer: no credit until it passes again
    clock.now += HOUR / 2
    assert ledger.record_online("server", blocks=4) == 0.0
    view = ledger.contribution("server")
    assert (view.probes_passed, view.probes_failed, view.probes_wrong) == (2, 1, 0)
    assert view.credit == pytest.approx(6.0, rel=1e-3)


def test_a_wrong_answer_wipes_credit_and_bans():
    ledger, clock = make_ledger(lie_penalty=HOUR)
    ledger.record_consumed("liar", tokens=10_000, blocks=2)
    ledger.record_probe("liar", "passed")
    assert ledger.credit_of("liar") > 0
    ledger.record_probe("liar", "wrong")
    assert ledger.credit_of("liar") == 0.0 and ledger.priority_of("liar") == 1.0
    assert ledger.contribution("liar").banned
    ledger.record_consumed("liar", tokens=10_000, blocks=2)  # work while banned counts for nothing
    assert ledger.credit_of("liar") == 0.0
    clock.now += 2 * HOUR
    assert not ledger.contribution("liar").banned
    with pytest.raises(ValueError):
        ledger.record_probe("liar", "maybe")


def test_judge_probe():
    torch.manual_seed(0)
    ours = torch.randn(1, 4, 64)
    assert judge_probe(ours, ours.clone(), 0.1) == "passed"
    assert judge_probe(ours, ours.to(torch.bfloat16), 0.1) == "passed"  # another dtype is fine
    assert judge_probe(ours, torch.randn(1, 4, 64), 0.1) == "wrong"
    assert judge_probe(ours, ours[:, :2], 0.1) == "wrong"
    assert judge_probe(ours, torch.full_like(ours, float("nan")), 0.1) == "wrong"


# --- bounded size ---


def test_eviction_keeps_the_valuable_and_the_recent():
    ledger, clock = make_ledger(max_peers=10)
    ledger.record_consumed("valuable", tokens=1000, blocks=1)
    ledger.record_probe("liar", "wrong")
    for index in range(30):
        clock.now += 1
        ledger.record_served(f"client-{index}", TaskKind.FORWARD, 0, 1, 0.0)  # no points: only recency
    peers = {view.peer_id for view in ledger.contributions()}
    assert len(peers) <= 10
    assert {"valuable", "liar", "client-29"} <= peers  # the liar stays on record, banned
    assert "client-0" not in peers
    assert eviction_order([("a", 1.0, 5.0), ("b", 0.0, 9.0), ("c", 0.0, 1.0)]) == ["c", "b", "a"]


# --- the file ---


def test_ledger_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.json"
    clock = Clock()
    ledger = Ledger.open(path, clock=clock)
    ledger.record_consumed("contributor", tokens=2000, blocks=3, seconds=1.0)
    ledger.record_served("client", TaskKind.INFERENCE, 500, 2, 0.25)
    ledger.record_probe("liar", "wrong")
    ledger.close()
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed over the ledger

    again = Ledger.open(path, clock=clock)
    assert again.credit_of("contributor") == pytest.approx(6.0)
    assert again.contribution("client").served_token_blocks == 1000
    assert again.contribution("liar").banned
    assert again.points() == pytest.approx(1.0)
    assert again.summary()["consumed_token_blocks"] == 6000


def test_engine_ledger_lives_in_the_data_dir_across_restarts(tmp_path, monkeypatch, caplog):
    from engine.ledger import default_ledger_path

    monkeypatch.setenv("POLLINATE_DATA_DIR", str(tmp_path / "data"))
    path = default_ledger_path()
    assert path == tmp_path / "data" / "ledger.json"
    first = Ledger.open(path)
    first.start_autosave(period=0.05)
    first.record_consumed("contributor", tokens=100, blocks=2)
    assert wait_until(path.exists)  # saved in the background, without waiting for close()
    first.close()
    assert Ledger.open(default_ledger_path()).contribution("contributor").consumed_token_blocks == 200

    path.write_bytes(path.read_bytes()[:-10])  # the disk lost the end of the file
    with caplog.at_level(logging.WARNING, logger="engine.ledger"):
        restarted = Ledger.open(default_ledger_path())
    assert restarted.contributions() == [] and "damaged" in caplog.text
    assert list(path.parent.glob("ledger.json.corrupt-*"))


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: text.replace('"tokens": 2000', '"tokens": 9999'),  # edited: checksum no longer matches
        lambda text: text.replace('"version": 1', '"version": 99'),  # from the future
        lambda text: "\x00\xff garbage",
    ],
    ids=["truncated", "tampered", "version", "garbage"],
)
def test_a_damaged_ledger_is_set_aside_and_the_engine_starts_clean(tmp_path, caplog, damage):
    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path)
    ledger.record_consumed("contributor", tokens=2000, blocks=3)
    ledger.save()
    path.write_text(damage(path.read_text()))

    with caplog.at_level(logging.WARNING, logger="engine.ledger"):
        clean = Ledger.open(path)
    assert clean.credit_of("contributor") == 0.0 and clean.contributions() == []
    aside = list(tmp_path.glob("ledger.json.corrupt-*"))
    assert len(aside) == 1 and not path.exists()
    assert "set aside" in caplog.text
    clean.record_consumed("someone", 10, 1)
    clean.save()
    assert json.loads(path.read_text())["format"] == "pollinate-ledger"


def test_a_body_with_bad_values_counts_as_damaged(tmp_path):
    from engine.ledger import store

    path = tmp_path / "ledger.json"
    store.save(path, {"accounts": [{"peer_id": "x", "served": {"tokens": -5}}]})
    assert Ledger.open(path).contributions() == []
    assert len(list(tmp_path.glob("ledger.json.corrupt-*"))) == 1


# --- the aging queue ---


def test_queue_serves_earned_priority_first_within_a_class():
    pool = TaskPool()
    pool.start()
    try:
        gate = threading.Event()
        order: list[str] = []
        blocker = pool.submit(gate.wait, kind=TaskKind.FORWARD)
        time.sleep(0.05)
        futures = [pool.submit(order.append, "free-rider", kind=TaskKind.FORWARD, priority=1.0)]
        futures.append(pool.submit(order.append, "contributor", kind=TaskKind.FORWARD, priority=0.1))
        futures.append(pool.submit(order.append, "inference", kind=TaskKind.INFERENCE, priority=1.0))
        gate.set()
        for future in (blocker, *futures):
            future.result(5)
        assert order == ["inference", "contributor", "free-rider"]
    finally:
        pool.stop()


def test_aging_bounds_the_wait_of_a_free_rider_under_a_flood():
    """A contributor keeps the queue full of better-placed work; the free-rider still runs in bounded time."""
    delay, task_seconds = 0.3, 0.005
    pool = TaskPool()
    pool.start()
    stop = threading.Event()

    def flood() -> None:
        pending = []
        while not stop.is_set():
            pending = [f for f in pending if not f.done()]
            while len(pending) < 8:
                pending.append(pool.submit(time.sleep, task_seconds, kind=TaskKind.FORWARD, priority=0.0))
            time.sleep(task_seconds / 2)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        time.sleep(0.1)
        waits = []
        for _ in range(3):
            started = time.monotonic()
            pool.submit(lambda: None, kind=TaskKind.FORWARD, priority=delay).result(10)
            waits.append(time.monotonic() - started)
        # Bound: its delay, plus the 8 tasks queued ahead of it, plus the one running (and scheduling slack).
        bound = delay + 9 * task_seconds + 0.25
        print(f"free-rider waits under a flood: {[round(w, 3) for w in waits]} s (bound {bound:.3f} s)")
        assert max(waits) <= bound
        assert min(waits) >= delay * 0.8  # it did wait: the flood went first
    finally:
        stop.set()
        flooder.join(5)
        pool.stop()


def test_every_own_peer_id_is_self():
    """A node's client and each of its servers have their own peer ids; none earns points from another."""
    ledger = Ledger()
    ledger.set_self("client-peer")
    ledger.set_self("server-peer")
    ledger.record_served("client-peer", "inference", tokens=1000, blocks=4, seconds=1.0)
    ledger.record_served("server-peer", "inference", tokens=1000, blocks=4, seconds=1.0)
    assert ledger.summary()["points"] == 0
    ledger.record_served("someone-else", "inference", tokens=1000, blocks=4, seconds=1.0)
    assert ledger.summary()["points"] > 0


@pytest.mark.parametrize("damage", ["nested", "directory"])
def test_ledgers_that_blocked_start_up_are_set_aside_and_reported(tmp_path, damage):
    """Issue 12 #8: deeply nested JSON and a folder named ledger.json kept the engine in error for good."""
    from contract.stores import pending

    path = tmp_path / "ledger.json"
    if damage == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        (path / "inside").mkdir(parents=True)
    ledger = Ledger.open(path)
    assert ledger.contributions() == []
    ledger.record_consumed("someone", 10, 1)
    ledger.save()  # a fresh ledger file where the damaged one was
    assert json.loads(path.read_text())["format"] == "pollinate-ledger"
    (aside,) = tmp_path.glob("ledger.json.corrupt-*")
    (notice,) = pending(tmp_path)  # for the app to tell the user
    assert notice.moved_to == str(aside) and notice.path == str(path)
    assert "contribution ledger" in notice.message() and str(aside) in notice.message()
