"""The swarm tab's content from /api/swarm: one row per server, one line per model (pure functions)."""

from __future__ import annotations

SERVER_COLUMNS = (
    "Name", "Version", "State", "Blocks", "Throughput", "Cache left", "Quantization", "Reachability",
    "Served us",
)  # fmt: skip

REACHABILITY_WORDS = {"direct": "direct", "relayed": "behind NAT, relayed", "unknown": "not said"}


def _number(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{float(value):,.{digits}f}" if isinstance(value, float) else f"{int(value):,}"


def server_rows(swarm: dict | None) -> list[tuple[str, ...]]:
    """One row of text per server of the model in /api/swarm, Petals servers included."""
    rows = []
    for server in (swarm or {}).get("servers") or []:
        peer = str(server.get("peer_id") or "")
        name = server.get("public_name") or f"…{peer[-8:]}"
        seen = server.get("observed_contribution") or {}
        served = seen.get("consumed_token_blocks")
        rows.append(
            (
                name,
                server.get("version") or "—",
                str(server.get("state") or "—"),
                f"{server.get('start_block')}–{int(server.get('end_block') or 0) - 1}",
                _number(server.get("throughput")),
                _number(server.get("cache_tokens_left")),
                server.get("quant_type") or "—",
                REACHABILITY_WORDS.get(server.get("reachability") or "unknown", "not said"),
                "—" if served is None else f"{int(served):,} token·blocks",
            )
        )
    return rows


def model_lines(swarm: dict | None) -> list[str]:
    """One line per model the swarm's index announces: how many of its blocks are served, by how many."""
    lines = []
    for model in (swarm or {}).get("models") or []:
        name = (model.get("repository") or "").removeprefix("https://huggingface.co/") or model.get(
            "dht_prefix"
        )
        total, covered = int(model.get("num_blocks") or 0), int(model.get("covered_blocks") or 0)
        state = "complete" if model.get("complete") else f"{total - covered} block(s) without a server"
        lines.append(
            f"{name}: {covered}/{total} blocks served by {model.get('servers', 0)} server(s), {state}"
        )
    return lines


REACHABILITY_HEADLINES = {
    "reachable": "Other peers can connect to this computer directly.",
    "relayed": "Behind NAT: other peers reach this computer through a relay.",
    "unreachable": "Other peers cannot connect to this computer.",
    "unknown": "Whether other peers can connect to this computer is not known yet (no peer could check).",
}


def reachability_text(status: dict | None) -> str:
    """The hosted server's reachability in a sentence, with the one thing to do about it ("": unchecked)."""
    report = (status or {}).get("reachability") or {}
    state = report.get("state")
    if state not in REACHABILITY_HEADLINES:
        return ""
    advice = report.get("advice")
    return REACHABILITY_HEADLINES[state] + (f" {advice}" if advice else "")
