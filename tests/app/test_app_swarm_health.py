"""The dashboard's Swarm tab: rows per server (Petals ones too) and a line per model, from /api/swarm."""

from __future__ import annotations

from app.viewmodels.swarm_health import SERVER_COLUMNS, model_lines, server_rows
from app.windows.swarm_health import SwarmHealthView

SWARM = {
    "model": "meta-llama/Llama-2-70b-hf",
    "servers": [
        {
            "peer_id": "QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
            "public_name": None,
            "version": "2.2.0.post1",
            "state": "online",
            "start_block": 0,
            "end_block": 40,
            "throughput": 812.25,
            "cache_tokens_left": 16384,
            "quant_type": "nf4",
            "reachability": "relayed",
            "observed_contribution": {"consumed_token_blocks": 1200},
        },
        {
            "peer_id": "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
            "public_name": "alice's 4090",
            "version": "0.1.0",
            "state": "joining",
            "start_block": 40,
            "end_block": 80,
            "throughput": 300.0,
        },
    ],
    "models": [
        {"dht_prefix": "Llama-2-70b-hf", "repository": "https://huggingface.co/meta-llama/Llama-2-70b-hf",
         "num_blocks": 80, "covered_blocks": 80, "complete": True, "servers": 2},
        {"dht_prefix": "bloom-petals", "repository": None, "num_blocks": 70, "covered_blocks": 30,
         "complete": False, "servers": 1},
    ],
}  # fmt: skip


def test_rows_and_model_lines():
    petals, ours = server_rows(SWARM)
    assert len(petals) == len(SERVER_COLUMNS)
    assert petals == (
        "…" + "QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5"[-8:],
        "2.2.0.post1", "online", "0–39", "812.2", "16,384", "nf4", "behind NAT, relayed",
        "1,200 token·blocks",
    )  # fmt: skip
    assert ours[0] == "alice's 4090" and ours[2] == "joining" and ours[5:9] == ("—", "—", "not said", "—")
    assert model_lines(SWARM) == [
        "meta-llama/Llama-2-70b-hf: 80/80 blocks served by 2 server(s), complete",
        "bloom-petals: 30/70 blocks served by 1 server(s), 40 block(s) without a server",
    ]
    assert server_rows(None) == [] and model_lines({}) == []


def test_view_fills_the_table(qtbot):
    view = SwarmHealthView()
    qtbot.addWidget(view)
    assert view.table.rowCount() == 0 and "unknown" in view.models_label.text()
    view.show_swarm(SWARM)
    assert view.table.rowCount() == 2
    assert view.table.item(0, 1).text() == "2.2.0.post1" and view.table.item(1, 0).text() == "alice's 4090"
    assert "80/80 blocks" in view.models_label.text() and "Servers of meta-llama/Llama-2-70b-hf" in (
        view.models_label.text()
    )
    view.show_swarm({"model": "m", "servers": [], "models": []})
    assert view.table.rowCount() == 0 and "index is empty" in view.models_label.text()


def test_reachability_sentence_carries_the_advice():
    from app.viewmodels.swarm_health import reachability_text

    advice = "Other peers cannot connect ...: forward TCP port 31337 from your router to this computer."
    status = {"reachability": {"state": "unreachable", "advice": advice, "port": 31337}}
    assert reachability_text(status) == "Other peers cannot connect to this computer. " + advice
    reachable = {"reachability": {"state": "reachable", "advice": None}}
    assert reachability_text(reachable).startswith("Other peers can")
    assert reachability_text({"reachability": None}) == "" and reachability_text(None) == ""
