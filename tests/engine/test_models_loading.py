"""Finding checkpoints, reading only the needed tensors, family registry, and size estimates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.models import (
    BlockSpan,
    ModelError,
    ModelNotFoundError,
    UnsupportedModelError,
    block_weight_bytes,
    cache_bytes,
    default_quant,
    family_for,
    load_block_span,
    load_client_parts,
    load_config,
    load_tokenizer,
    resolve_checkpoint,
    supported_model_types,
)
from engine.models.checkpoint import INDEX_FILE

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_span_of_two_of_eight_blocks_reads_only_its_tensors(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=8)
    span = load_block_span(path, 3, 5)
    stats = span.load_stats
    per_block = len(span.blocks[0].state_dict())
    assert stats.tensors_read == 2 * per_block
    assert stats.tensors_read < stats.tensors_in_checkpoint / 3
    head = load_client_parts(path)
    assert head.load_stats.tensors_read == 3  # embeddings, final norm, LM head


def test_tied_embeddings_share_the_head(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("qwen2", tie_word_embeddings=True)
    head = load_client_parts(path)
    assert head.load_stats.tensors_read == 2
    assert head.lm_head.weight is head.embed_tokens.weight
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 3, 17]])
    with torch.no_grad():
        logits = head.logits(load_block_span(path, 0, 4)(head.embed(ids)))
        assert (logits - model(ids).logits).abs().max() < 1e-4


def test_local_folder_config_and_tokenizer(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("mistral")
    assert resolve_checkpoint(path) == path.resolve()
    assert load_config(path).model_type == "mistral"
    assert load_tokenizer(path).decode(load_tokenizer(path)("Hello")["input_ids"]) == "Hello"


def _fake_hub_cache(root, source, repo_id="acme/tiny-llama"):
    """Lay out `source` as huggingface_hub caches it: models--owner--name/{refs/main,snapshots/sha}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    snapshot = repo / "snapshots" / FAKE_COMMIT
    shutil.copytree(source, snapshot)
    return snapshot


def test_hub_id_resolves_from_offline_cache(tiny_checkpoint_factory, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_cache = tmp_path / "hf-home" / "hub"
    snapshot = _fake_hub_cache(hub_cache, tiny_checkpoint_factory("llama"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads HF_HOME at import; the test repoints the constant it derived from it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))

    path = resolve_checkpoint("acme/tiny-llama")
    assert path == snapshot.resolve()
    assert resolve_checkpoint("acme/tiny-llama", cache_dir=hub_cache) == path
    assert isinstance(load_block_span(path, 2, 4), BlockSpan)

    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("acme/no-such-model")


def test_missing_shard_offline_is_a_clear_error(tiny_checkpoint_factory, tmp_path, monkeypatch):
    import json

    snapshot = _fake_hub_cache(tmp_path, tiny_checkpoint_factory("llama"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weight_map = json.loads((snapshot / INDEX_FILE).read_text())["weight_map"]
    (snapshot / weight_map["model.layers.3.mlp.down_proj.weight"]).unlink()  # not downloaded yet
    load_block_span(snapshot, 0, 2)  # shards of other blocks are not needed
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_block_span(snapshot, 2, 4)


@pytest.mark.parametrize("model", ["./no/such/folder", "/no/such/folder", "not a valid id!"])
def test_bad_names_raise_model_not_found(model, tmp_path):
    with pytest.raises(ModelNotFoundError):
        resolve_checkpoint(model)
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_checkpoint(tmp_path)  # a folder that is not a checkpoint


def test_registry_and_unsupported_types():
    from transformers import AutoConfig

    families = {"bloom", "falcon", "llama", "mistral", "mixtral", "qwen2", "qwen3"}
    assert set(supported_model_types()) >= families
    with pytest.raises(UnsupportedModelError, match="bloom, falcon, llama, mistral, mixtral, qwen2, qwen3"):
        family_for(AutoConfig.for_model("gpt2"))


@pytest.mark.parametrize(
    ("model_type", "repo", "prefix"),
    [
        ("llama", "meta-llama/Llama-2-70b-chat-hf", "Llama-2-70b-chat-hf"),
        ("llama", "meta-llama/Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3-1-8B-Instruct-hf"),
        ("llama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama-1-1B-Chat-v1-0-hf"),
        ("mistral", "mistralai/Mistral-7B-Instruct-v0.2", "Mistral-7B-Instruct-v0-2"),
        ("qwen2", "Qwen/Qwen2.5-7B-Instruct", "Qwen2-5-7B-Instruct"),
        ("qwen3", "Qwen/Qwen3-8B", "Qwen3-8B"),
        ("falcon", "tiiuae/falcon-40b-instruct", "falcon-40b-instruct"),  # Petals: repo name only
        ("bloom", "bigscience/bloom-7b1", "bigscience/bloom-7b1-petals"),  # Petals: owner kept, "-petals"
        ("mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0-1"),
    ],
)
def test_default_dht_prefix_follows_petals(model_type, repo, prefix):
    assert family_for(model_type).default_dht_prefix(repo) == prefix


def test_a_checkpoint_s_own_dht_prefix_wins(tiny_checkpoint_factory):
    """Petals reads `dht_prefix` from config.json first (its client requires it for a local folder)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", dht_prefix="my-swarm-model")
    assert family_for(config).dht_prefix_for(config, "/somewhere/else") == "my-swarm-model"
    plain = AutoConfig.for_model("llama")
    assert family_for(plain).dht_prefix_for(plain, "org/Some-Model") == "Some-Model-hf"


def test_size_estimates_match_what_is_allocated(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    span = load_block_span(path, 0, 2)
    actual = sum(t.numel() * t.element_size() for t in span.blocks.parameters())
    assert block_weight_bytes(span.config, quant="none", dtype=torch.float32) * 2 == actual
    half = block_weight_bytes(span.config, quant="none", dtype=torch.bfloat16)
    assert block_weight_bytes(span.config, quant="nf4", dtype=torch.bfloat16) < half / 3
    assert block_weight_bytes(span.config, quant="int8", dtype=torch.bfloat16) < half * 0.6
    cache = span.new_cache(batch_size=3, max_length=10)
    assert cache.nbytes == cache_bytes(span.config, 2, 3, 10, torch.float32)
    assert default_quant("cpu") == "none" and default_quant("cuda:0") == "nf4"
    with pytest.raises(ValueError, match="nf4"):
        load_block_span(path, 0, 1, quant="fp8")
    with pytest.raises(ValueError, match="outside"):
        load_block_span(path, 2, 5)


def test_bloom_checkpoint_in_its_hub_layout_loads(tiny_checkpoint_factory, tmp_path):
    """bigscience/bloom* repos name tensors without "transformer." ("h.0.", "word_embeddings.weight")."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.checkpoints import strip_key_prefix

    path = strip_key_prefix(shutil.copytree(tiny_checkpoint_factory("bloom"), tmp_path / "bloom-hub-layout"))
    assert not any(
        k.startswith("transformer.") for k in json.loads((path / INDEX_FILE).read_text())["weight_map"]
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head, span = load_client_parts(path), load_block_span(path, 0, 4)
    ids = torch.tensor([[5, 9, 3, 17, 200]])
    with torch.no_grad():
        assert (head.logits(span(head.embed(ids))) - model(ids).logits).abs().max() < 1e-4
