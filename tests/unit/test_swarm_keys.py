"""Key conventions: block uids, chains, dht_prefix rules (as Petals derives them)."""

import pytest

from engine.swarm.keys import (
    MODELS_INDEX_KEY,
    UID_DELIMITER,
    InvalidUidError,
    block_uid,
    block_uids,
    default_dht_prefix,
    is_private_prefix,
    join_uids,
    parse_block_uid,
    split_uids,
    validate_dht_prefix,
)


def test_block_uids_follow_petals():
    assert MODELS_INDEX_KEY == "_petals.models"
    assert block_uid("Llama-2-70b-hf", 3) == "Llama-2-70b-hf.3"
    assert block_uids("m", 2, 5) == ["m.2", "m.3", "m.4"]
    assert block_uids("m", 4, 4) == []
    assert join_uids(block_uids("m", 0, 2)) == "m.0 m.1" and UID_DELIMITER == " "
    assert split_uids("m.0 m.1") == ["m.0", "m.1"]


def test_parse_block_uid():
    assert parse_block_uid("bigscience/bloom-petals.69") == ("bigscience/bloom-petals", 69)


@pytest.mark.parametrize(
    "uid", ["m", "m.", ".3", "m.x", "m.-1", "m.+1", "m.1.2", "m.0 m.1", "m.١", 5, None, "m.1234567890"]
)
def test_parse_block_uid_rejects(uid):
    with pytest.raises(InvalidUidError):
        parse_block_uid(uid)


@pytest.mark.parametrize("prefix", ["", "a.b", "a b", None, "x" * 300])
def test_invalid_prefixes(prefix):
    with pytest.raises(InvalidUidError):
        validate_dht_prefix(prefix)


def test_block_uid_rejects_bad_index():
    for index in (-1, True, 1.0):
        with pytest.raises(InvalidUidError):
            block_uid("m", index)
    with pytest.raises(InvalidUidError):
        block_uids("m", 3, 2)


def test_default_dht_prefix_matches_petals_rules():
    assert (
        default_dht_prefix("meta-llama/Meta-Llama-3.1-405B-Instruct", "llama")
        == "Meta-Llama-3-1-405B-Instruct-hf"
    )
    assert default_dht_prefix("meta-llama/Llama-2-70b-hf", "llama") == "Llama-2-70b-hf"
    assert default_dht_prefix("tiiuae/falcon-180B-chat", "falcon") == "falcon-180B-chat"
    assert default_dht_prefix("bigscience/bloom-7b1", "bloom") == "bigscience/bloom-7b1-petals"
    assert (
        default_dht_prefix("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral")
        == "mistralai/Mixtral-8x7B-Instruct-v0-1"
    )
    assert default_dht_prefix("Qwen/Qwen2.5-7B", "qwen2") == "Qwen2-5-7B"


def test_private_prefix():
    assert is_private_prefix("_secret") and not is_private_prefix("public-hf")


def test_one_dht_prefix_rule_for_the_registry_and_the_swarm_layer():
    """engine.models' families and engine.swarm.keys used to disagree (whitespace, bloom, mixtral)."""
    from engine.models import family_for

    repos = {
        "llama": ["meta-llama/Llama-2-70b-hf", "someone/My Model 3.1"],
        "mistral": ["mistralai/Mistral-7B-v0.1", "x/name with  spaces"],
        "qwen2": ["Qwen/Qwen2.5-7B"],
    }
    for family, names in repos.items():
        for repo in names:
            assert family_for(family).default_dht_prefix(repo) == default_dht_prefix(repo, family)
            assert " " not in default_dht_prefix(repo, family) and "." not in default_dht_prefix(repo, family)
