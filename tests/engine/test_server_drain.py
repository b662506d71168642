"""BlockHost.drain on a real host: announce OFFLINE, refuse work, grace period, end sessions, hold/release."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.models.span import load_block_span
from engine.server.block_host import MOVING_MESSAGE
from engine.server.drain import DrainMode
from engine.swarm.discovery import get_block_infos
from engine.swarm.records import ServerState
from tests.helpers.servers import WireClient, running_server, wait_for

PREFIX = "drain"
UIDS = "drain.0 drain.1"
HIDDEN = 64


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", num_layers=2)


@pytest.fixture(scope="module")
def host(checkpoint, bootstrap):
    with running_server(checkpoint, bootstrap, start_block=0, end_block=2, dht_prefix=PREFIX) as host:
        yield host


@pytest.fixture(scope="module")
def client(host):
    with WireClient(list(host.info().multiaddrs)) as wire:
        yield wire


def _record_state(dht, peer_id):
    record = get_block_infos(dht, PREFIX, 2)[0].get(peer_id)
    return record.state if record is not None else None


def test_hold_ends_open_sessions_after_grace_refuses_new_work_and_resumes(
    host, client, bootstrap_dht, checkpoint
):
    dht = bootstrap_dht
    me = host.info().peer_id
    assert wait_for(lambda: _record_state(dht, me) == ServerState.ONLINE, timeout=20)
    with client.inference(UIDS, max_length=8) as session:
        session.step(torch.randn(1, 2, HIDDEN))
        report = host.pause(grace_seconds=0.3)  # the session stays idle: the drain must end it
        assert (report.mode, report.sessions_at_start, report.sessions_ended) == (DrainMode.HOLD, 1, 1)
        # The server ended the stream (with its reason): the client sees that error, a closed pipe or the
        # end of the stream, depending on timing; any of them makes our client replay elsewhere.
        with pytest.raises(Exception):  # noqa: B017
            session.step(torch.randn(1, 1, HIDDEN))
    assert host.info().state.value == "paused" and host.info().sessions_open == 0
    assert wait_for(lambda: _record_state(dht, me) == ServerState.OFFLINE, timeout=20)
    with pytest.raises(Exception, match="pausing"):
        client.forward(UIDS, torch.randn(1, 2, HIDDEN))
    with client.inference(UIDS, max_length=8) as refused, pytest.raises(Exception, match="pausing"):
        refused.step(torch.randn(1, 2, HIDDEN))

    host.resume()
    assert host.info().state.value == "serving"
    assert wait_for(lambda: _record_state(dht, me) == ServerState.ONLINE, timeout=20)
    hidden = torch.randn(1, 3, HIDDEN)
    expected = load_block_span(checkpoint, 0, 2).forward(hidden)
    with client.inference(UIDS, max_length=8) as session:
        assert torch.allclose(session.step(hidden), expected, atol=1e-5)


def test_a_session_that_finishes_within_grace_is_not_ended(host, client):
    with client.inference(UIDS, max_length=8) as session:
        session.step(torch.randn(1, 2, HIDDEN))
        reports = []
        drain = threading.Thread(target=lambda: reports.append(host.pause(grace_seconds=30.0)))
        drain.start()
        assert wait_for(lambda: host.info().state.value == "draining", timeout=10)
        session.step(torch.randn(1, 1, HIDDEN))  # a running session keeps working during the grace period
    drain.join(30)
    (report,) = reports
    assert (report.sessions_at_start, report.sessions_ended) == (1, 0)
    assert report.quiet_seconds < 30.0
    host.resume()


def test_a_moving_host_tells_clients_it_is_moving(host, client):
    # A rebalancing move drains with its own reason: clients read why (and fail over the same way).
    host.drain(0.0, DrainMode.HOLD, reason=MOVING_MESSAGE)
    try:
        with pytest.raises(Exception, match="moving to other blocks") as refused:
            client.forward(UIDS, torch.randn(1, 2, HIDDEN))
        assert "owner needs" not in str(refused.value)
    finally:
        host.resume()


def test_release_frees_the_span_and_stops(checkpoint, bootstrap):
    with running_server(
        checkpoint, bootstrap, start_block=0, end_block=2, dht_prefix="drain-release"
    ) as host:
        report = host.drain(0.0, DrainMode.RELEASE)
        assert report.mode == DrainMode.RELEASE and report.sessions_at_start == 0
        assert host.info().state.value == "stopped"
        assert host._hosted is None and host._handler is None  # the weights are no longer referenced
        with pytest.raises(RuntimeError, match="paused host"):
            host.resume()


def test_throttle_caps_sessions_and_compute_share(host, client):
    host.set_throttle(max_sessions=1, compute_share=0.5)
    try:
        with client.inference(UIDS, max_length=8) as first:
            first.step(torch.randn(1, 2, HIDDEN))
            with client.inference(UIDS, max_length=8) as second, pytest.raises(Exception, match="limit of 1"):
                second.step(torch.randn(1, 2, HIDDEN))
            first.step(torch.randn(1, 1, HIDDEN))  # the session within the cap goes on
        with pytest.raises(ValueError, match="compute_share"):
            host.set_throttle(compute_share=0.0)
    finally:
        host.set_throttle()
    with client.inference(UIDS, max_length=8) as one, client.inference(UIDS, max_length=8) as two:
        one.step(torch.randn(1, 2, HIDDEN))
        two.step(torch.randn(1, 2, HIDDEN))
