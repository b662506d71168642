"""Credit only from evidence the serving node checked: probes, fake records, liars, and Sybils.

Server S probes every server that announces blocks it hosts: an honest one (same weights) earns credit for
its verified ONLINE time; one with other weights (wrong answers) is banned; a record claiming huge
throughput with no server behind it earns nothing. Ten identities that "serve each other", announce huge
throughput and points, and declare points in their requests get the newcomer priority from S, no better.
"""

from __future__ import annotations

import pytest
import torch

from engine.ledger import Auditor, Ledger, LedgerPolicy
from engine.server.task_pool import TaskKind
from engine.swarm.records import ServerInfo, ServerState
from tests.helpers.ledger_servers import PeerCaller, ledger_server
from tests.helpers.servers import WireClient, running_server

pytestmark = pytest.mark.slow

HUGE = 1e9


def _announce_as(dht, peer_id: str, dht_prefix: str, blocks: range, points: float) -> None:
    """Write ONLINE records under someone else's peer id: anyone can, the DHT does not check subkeys."""
    from hivemind.utils import get_dht_time

    info = ServerInfo(
        state=ServerState.ONLINE,
        throughput=HUGE,
        start_block=blocks.start,
        end_block=blocks.stop,
        points=points,
        inference_rps=HUGE,
        forward_rps=HUGE,
    )
    for index in blocks:
        assert dht.store(f"{dht_prefix}.{index}", info.to_tuple(), get_dht_time() + 300, subkey=peer_id)


def test_only_verified_service_earns_and_sybils_mint_nothing(bootstrap_peer, tiny_checkpoint_factory):
    bootstrap, initial_peers = bootstrap_peer
    checkpoint = tiny_checkpoint_factory("llama", num_layers=2)
    other_weights = tiny_checkpoint_factory("llama", num_layers=2, seed=1)
    policy = LedgerPolicy(base_delay=1.0, credit_scale=0.001)
    ledger = Ledger(policy)
    sybils: list[PeerCaller] = []
    with (
        ledger_server(checkpoint, initial_peers, ledger, start_block=0, end_block=2) as server,
        running_server(checkpoint, initial_peers, start_block=0, end_block=2) as honest,
        running_server(
            other_weights, initial_peers, start_block=0, end_block=2, dht_prefix=server.info().dht_prefix
        ) as liar,
        PeerCaller() as fake,
    ):
        info = server.info()
        prefix, uid = info.dht_prefix, f"{info.dht_prefix}.0 {info.dht_prefix}.1"
        auditor = Auditor(ledger, server, probe_timeout=10.0)
        try:
            fake.connect(info.multiaddrs)
            _announce_as(bootstrap, fake.peer_id, prefix, range(0, 2), points=HUGE)
            for _ in range(10):
                sybils.append(PeerCaller())
            sybil_ids = [sybil.peer_id for sybil in sybils]
            for sybil in sybils:
                # They "serve each other": each one's own ledger credits the other nine...
                own = Ledger(policy)
                for other in sybil_ids:
                    if other != sybil.peer_id:
                        own.record_consumed(other, tokens=10**6, blocks=2, seconds=100.0)
                assert own.credit_of(sybil_ids[0] if sybil is not sybils[0] else sybil_ids[1]) > 0
                # ...announce huge throughput and those points, and ask S for work declaring them.
                _announce_as(bootstrap, sybil.peer_id, prefix, range(0, 2), points=own.points() + HUGE)
                sybil.connect(info.multiaddrs)
                sybil.run(sybil.forward(info.peer_id, uid, torch.randn(1, 4, 64), points=HUGE))

            reports = [auditor.run_round() for _ in range(len(sybils) + 4)]
        finally:
            auditor.stop()
            for sybil in sybils:
                sybil.close()

        # A Petals-format inference session (points declared, as Petals does) is counted per step.
        with WireClient(info.multiaddrs) as petals_client, petals_client.inference(uid, 16) as session:
            session.step(torch.randn(1, 3, 64))
            session.step(torch.randn(1, 1, 64))
        assert ledger.contribution(petals_client.p2p.peer_id.to_base58()).served_token_blocks == (3 + 1) * 2
        assert ledger.priority_of(petals_client.p2p.peer_id.to_base58()) == 1.0

        outcomes = {}
        for report in reports:
            outcomes.setdefault(report.probed, set()).add(report.outcome)
        honest_id, liar_id = honest.info().peer_id, liar.info().peer_id
        assert outcomes[honest_id] == {"passed"}
        assert outcomes[liar_id] == {"wrong"}
        assert outcomes[fake.peer_id] == {"failed"}
        assert ledger.credit_of(honest_id) > 0 and ledger.priority_of(honest_id) > 1.0
        assert any(honest_id in report.credited for report in reports)
        assert ledger.contribution(liar_id).banned and ledger.credit_of(liar_id) == 0.0
        assert ledger.credit_of(fake.peer_id) == 0.0

        for sybil_id in sybil_ids:
            assert ledger.credit_of(sybil_id) == 0.0
            assert ledger.priority_of(sybil_id) == 1.0
            assert ledger.priority_delay(sybil_id, TaskKind.FORWARD, HUGE) == policy.base_delay
            assert ledger.contribution(sybil_id).served_token_blocks == 4 * 2  # S did serve them
        probed_sybils = [peer for peer in outcomes if peer in sybil_ids]
        assert probed_sybils and all(outcomes[peer] == {"failed"} for peer in probed_sybils)
        print(f"\nprobe outcomes: { {peer[-6:]: sorted(o) for peer, o in outcomes.items()} }")
        credit, priority = ledger.credit_of(honest_id), ledger.priority_of(honest_id)
        print(f"honest server credit {credit:.6f}, priority {priority:.3f}")
