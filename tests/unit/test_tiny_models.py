"""Tiny random checkpoints and the embedded demo model: real Hugging Face folders, built offline."""

from __future__ import annotations

import json

import pytest

from engine.models.tiny import ARCHITECTURES, build_tokenizer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_checkpoint_is_a_sharded_hf_model(arch, tiny_checkpoint_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint_factory(arch)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1, "the factory must write several shards"
    assert all((path / shard).is_file() for shard in shards)
    assert AutoConfig.from_pretrained(path).model_type == arch

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer("Hello swarm", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_other_weights(tiny_checkpoint_factory):
    from safetensors.torch import load_file

    def first_layer(path):
        index = json.loads((path / "model.safetensors.index.json").read_text())
        key = "model.layers.0.self_attn.q_proj.weight"
        return load_file(path / index["weight_map"][key])[key]

    a = first_layer(tiny_checkpoint_factory("llama", seed=0))
    b = first_layer(tiny_checkpoint_factory("llama", seed=0, num_layers=4, hidden_size=64))
    c = first_layer(tiny_checkpoint_factory("llama", seed=1))
    assert (a == b).all()
    assert not (a == c).all()


def test_tokenizer_round_trips_text_and_applies_chat_template():
    tokenizer = build_tokenizer()
    text = "Share my GPU, please! 42 blocks."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in prompt
    assert tokenizer.eos_token == "<|im_end|>"


def test_demo_model_is_built_once_and_labelled(tmp_path, monkeypatch):
    from engine.demo import DEMO_MODEL_LABEL, demo_model_path, ensure_demo_model

    monkeypatch.setenv("POLLINATE_DATA_DIR", str(tmp_path))
    assert not demo_model_path().exists()
    path = ensure_demo_model()
    assert path.is_relative_to(tmp_path)
    facts = json.loads((path / "pollinate_tiny.json").read_text())
    assert facts["random_weights"] is True and facts["label"] == DEMO_MODEL_LABEL
    assert "random weights" in DEMO_MODEL_LABEL

    mtime = (path / "config.json").stat().st_mtime_ns
    assert ensure_demo_model() == path
    assert (path / "config.json").stat().st_mtime_ns == mtime, "a second call must not rebuild"

    # A stale recipe (an older Pollinate's demo) is rebuilt.
    facts["recipe"] = 0
    (path / "pollinate_tiny.json").write_text(json.dumps(facts))
    ensure_demo_model()
    assert json.loads((path / "pollinate_tiny.json").read_text())["recipe"] != 0
