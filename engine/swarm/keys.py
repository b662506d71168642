"""DHT key conventions shared with Petals 2.x: block uids, the model index key, dht_prefix rules.

A block uid is ``f"{dht_prefix}.{index}"`` (Petals calls the "." ``UID_DELIMITER``); a request over
several blocks names them joined by a space (Petals' ``CHAIN_DELIMITER``), e.g. ``"m-hf.3 m-hf.4"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MODELS_INDEX_KEY = "_petals.models"  # subkey = dht_prefix, value = ModelInfo.to_dict()

BLOCK_INDEX_DELIMITER = "."  # between dht_prefix and block index (Petals: UID_DELIMITER)
CHAIN_DELIMITER = " "  # between block uids of one request (Petals: CHAIN_DELIMITER)
# Our name for the chain delimiter. Careful: Petals' own constant named UID_DELIMITER is "." instead.
UID_DELIMITER = CHAIN_DELIMITER

# Version of Pollinate's own extensions to the Petals protocol, announced in ServerInfo's extra dict.
PROTOCOL_VERSION = 1

MAX_PREFIX_LENGTH = 256  # generous; keeps hostile keys from bloating logs and lookups


class InvalidUidError(ValueError):
    """A dht_prefix or block uid that does not follow the Petals conventions."""


def validate_dht_prefix(dht_prefix: str) -> str:
    """Return ``dht_prefix`` unchanged if it can prefix block uids, else raise InvalidUidError."""
    if not isinstance(dht_prefix, str) or not dht_prefix:
        raise InvalidUidError(f"dht_prefix must be a non-empty string, got {dht_prefix!r}")
    if len(dht_prefix) > MAX_PREFIX_LENGTH:
        raise InvalidUidError(f"dht_prefix is longer than {MAX_PREFIX_LENGTH} characters")
    if BLOCK_INDEX_DELIMITER in dht_prefix or CHAIN_DELIMITER in dht_prefix:
        raise InvalidUidError(
            f"dht_prefix {dht_prefix!r} must not contain {BLOCK_INDEX_DELIMITER!r} or {CHAIN_DELIMITER!r}; "
            "pass another --dht-prefix"
        )
    return dht_prefix


def is_private_prefix(dht_prefix: str) -> bool:
    """Petals servers keep models whose prefix starts with "_" out of the public model index."""
    return dht_prefix.startswith("_")


def block_uid(dht_prefix: str, index: int) -> str:
    """The DHT key of block ``index`` of the model announced under ``dht_prefix``."""
    validate_dht_prefix(dht_prefix)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise InvalidUidError(f"block index must be a non-negative int, got {index!r}")
    return f"{dht_prefix}{BLOCK_INDEX_DELIMITER}{index}"


def block_uids(dht_prefix: str, start: int, end: int) -> list[str]:
    """Uids of blocks ``start`` (inclusive) to ``end`` (exclusive)."""
    if not 0 <= start <= end:
        raise InvalidUidError(f"invalid block range [{start}, {end})")
    return [block_uid(dht_prefix, i) for i in range(start, end)]


def parse_block_uid(uid: str) -> tuple[str, int]:
    """Split ``"prefix.index"`` into ``(prefix, index)``; raise InvalidUidError on anything else."""
    if not isinstance(uid, str):
        raise InvalidUidError(f"block uid must be a string, got {type(uid).__name__}")
    if CHAIN_DELIMITER in uid:
        raise InvalidUidError(f"{uid!r} is a chain of uids; split it with split_uids() first")
    parts = uid.split(BLOCK_INDEX_DELIMITER)
    if len(parts) != 2:
        raise InvalidUidError(f"block uid {uid!r} must look like 'prefix{BLOCK_INDEX_DELIMITER}index'")
    prefix, index = parts
    validate_dht_prefix(prefix)
    # isascii + isdigit rejects "-1", "+1", " 1" and non-ASCII digits that int() would accept
    if not (index.isascii() and index.isdigit()) or len(index) > 9:
        raise InvalidUidError(f"block uid {uid!r} has an invalid index {index!r}")
    return prefix, int(index)


def join_uids(uids: Iterable[str]) -> str:
    """The request uid of a chain of blocks: their uids joined by a space, as Petals sends them."""
    return CHAIN_DELIMITER.join(uids)


def split_uids(chain: str) -> list[str]:
    """The block uids of a request uid; each one is validated."""
    uids = chain.split(CHAIN_DELIMITER)
    for uid in uids:
        parse_block_uid(uid)
    return uids


# The dht_prefix rules, in one place (the model families in engine/models name the rule they follow).


def _safe(name: str) -> str:
    # "." separates prefix from block index and whitespace separates uids in a chain: neither may remain.
    return re.sub(r"\s+", "-", name.replace(".", "-"))


def generic_dht_prefix(repo_id: str) -> str:
    """Petals' rule for most families: the repo name without its owner, "." (and spaces) -> "-"."""
    return validate_dht_prefix(_safe(str(repo_id).rstrip("/").split("/")[-1]))


def hf_suffixed_dht_prefix(repo_id: str) -> str:
    """Petals' Llama rule: the generic prefix plus "-hf" (unless already there), e.g. Llama-2-70b-chat-hf."""
    prefix = generic_dht_prefix(repo_id)
    return prefix if prefix.endswith("-hf") else validate_dht_prefix(prefix + "-hf")


def owner_kept_dht_prefix(repo_id: str, suffix: str = "") -> str:
    """Petals' Bloom ("-petals" suffix) and Mixtral rule: the whole repo id, owner included."""
    return validate_dht_prefix(_safe(str(repo_id).rstrip("/") + suffix))


DHT_PREFIX_RULES = {
    "llama": hf_suffixed_dht_prefix,
    "bloom": lambda repo_id: owner_kept_dht_prefix(repo_id, "-petals"),
    "mixtral": owner_kept_dht_prefix,
}


def default_dht_prefix(repo_id: str, family: str) -> str:
    """The dht_prefix Petals derives from a hub repo id, so our blocks join theirs.

    Llama: repo name without owner, "." -> "-", plus "-hf" unless already there. Falcon: same without
    the suffix. Bloom: owner kept, plus "-petals". Mixtral: owner kept. Families Petals does not serve
    (mistral, qwen2, ...) use the Falcon rule, so servers under different accounts merge.
    """
    return DHT_PREFIX_RULES.get(family, generic_dht_prefix)(repo_id)
