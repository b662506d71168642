"""Reading the swarm from the DHT: who serves which block, and which models are announced.

Everything a peer sends is validated; a malformed entry is skipped with a debug log, never raised, so one
broken or hostile server cannot hide the rest of the swarm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger

from engine.swarm.keys import MODELS_INDEX_KEY, block_uids, validate_dht_prefix
from engine.swarm.records import InvalidRecordError, ModelInfo, ServerInfo
from engine.swarm.snapshot import SwarmSnapshot

logger = get_logger(__name__)

MAX_SERVERS_PER_BLOCK = 4096  # more entries than this under one key is a flood, not a swarm


def _is_peer_id(text: Any) -> bool:
    if not isinstance(text, str) or not text or len(text) > 128:
        return False
    try:
        PeerID.from_base58(text)
    except Exception:  # base58 or multihash errors, whatever their type
        return False
    return True


def _unwrap(entry: Any) -> Any:
    # hivemind hands back ValueWithExpiration(value, expiration_time) per subkey; tests may pass raw values.
    return entry.value if hasattr(entry, "value") and hasattr(entry, "expiration_time") else entry


def parse_block_entries(uid: str, entries: Any) -> dict[str, ServerInfo]:
    """Turn one block's DHT dictionary (subkey = peer id -> record) into valid ServerInfos by peer id."""
    if entries is None:
        return {}
    if not isinstance(entries, Mapping):
        logger.debug("Ignoring %s: value is a %s, not a dictionary of servers", uid, type(entries).__name__)
        return {}
    servers: dict[str, ServerInfo] = {}
    for peer_id, entry in list(entries.items())[:MAX_SERVERS_PER_BLOCK]:
        if not _is_peer_id(peer_id):
            logger.debug("Ignoring %s entry: subkey %r is not a peer id", uid, peer_id)
            continue
        try:
            servers[peer_id] = ServerInfo.from_tuple(_unwrap(entry))
        except InvalidRecordError as e:
            logger.debug("Ignoring %s entry from %s: %s", uid, peer_id, e)
    return servers


async def _get_values(dht: DHT, node: Any, keys: list[str]) -> dict[str, Any]:
    # Runs inside the DHT process; returns plain data (subkey -> raw value) so nothing hivemind-specific
    # has to be unpickled by the caller. math.inf = keep searching for the newest copy (Petals' latest=True).
    num_workers = len(keys) if dht.num_workers is None else min(len(keys), dht.num_workers)
    found = await node.get_many(keys, math.inf, num_workers=max(num_workers, 1))
    result = {}
    for key in keys:
        item = found.get(key)
        value = None if item is None else item.value
        result[key] = {k: _unwrap(v) for k, v in value.items()} if isinstance(value, dict) else value
    return result


def _read(dht: DHT, keys: list[str], timeout: float | None) -> dict[str, Any]:
    """The values of `keys`; with a `timeout`, TimeoutError when the DHT peer has not answered by then."""
    if timeout is None:
        return dht.run_coroutine(partial(_get_values, keys=keys))
    future = dht.run_coroutine(partial(_get_values, keys=keys), return_future=True)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()  # nobody waits for it any more (the DHT process may still finish the search)
        raise TimeoutError(f"the DHT peer did not answer within {timeout:g} s") from None


def get_block_infos(
    dht: DHT, dht_prefix: str, num_blocks: int, timeout: float | None = None
) -> list[dict[str, ServerInfo]]:
    """For each block ``0..num_blocks-1`` of the model, the valid servers announcing it (by peer id)."""
    validate_dht_prefix(dht_prefix)
    uids = block_uids(dht_prefix, 0, num_blocks)
    if not uids:
        return []
    values = _read(dht, uids, timeout)
    return [parse_block_entries(uid, values.get(uid)) for uid in uids]


def fetch_snapshot(dht: DHT, dht_prefix: str, num_blocks: int, timeout: float | None = None) -> SwarmSnapshot:
    """The current state of one model's swarm, read from the DHT (TimeoutError after `timeout` seconds)."""
    return SwarmSnapshot(dht_prefix=dht_prefix, blocks=get_block_infos(dht, dht_prefix, num_blocks, timeout))


def parse_models_index(entries: Any) -> dict[str, ModelInfo]:
    """Turn the ``_petals.models`` dictionary (subkey = dht_prefix -> model record) into valid ModelInfos."""
    if not isinstance(entries, Mapping):
        return {}
    models = {}
    for prefix, entry in entries.items():
        try:
            validate_dht_prefix(prefix)
            models[prefix] = ModelInfo.from_dict(_unwrap(entry))
        except ValueError as e:  # InvalidRecordError and InvalidUidError are both ValueErrors
            logger.debug("Ignoring model index entry %r: %s", prefix, e)
    return models


def list_models(dht: DHT, timeout: float | None = None) -> dict[str, ModelInfo]:
    """The models announced in the swarm's index, by dht_prefix (private "_" prefixes never appear)."""
    values = _read(dht, [MODELS_INDEX_KEY], timeout)
    return parse_models_index(values.get(MODELS_INDEX_KEY))
