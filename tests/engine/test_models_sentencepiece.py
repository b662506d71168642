"""Older checkpoints: a Llama folder whose tokenizer is only a sentencepiece tokenizer.model."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from engine.models import ModelError, load_block_span, load_client_parts, load_tokenizer

_CORPUS = (
    "Pollinate shares GPUs in a peer-to-peer swarm that runs large language models. "
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris. "
)


def make_sentencepiece_folder(source: Path, target: Path) -> Path:
    """Copy a tiny llama checkpoint and replace its tokenizer by a sentencepiece-only one, as
    transformers 4.34 saved Llama 2 folders (tokenizer.model + tokenizer_config.json, no tokenizer.json)."""
    import sentencepiece

    shutil.copytree(source, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (target / name).unlink(missing_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.split(". ") * 20),
        model_writer=model,
        vocab_size=320,  # below the tiny model's 512 embeddings: every id has a row
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        minloglevel=2,
    )
    (target / "tokenizer.model").write_bytes(model.getvalue())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False, **specials}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "special_tokens_map.json").write_text(json.dumps(specials))
    return target


@pytest.fixture(scope="module")
def sentencepiece_folder(tiny_checkpoint_factory, tmp_path_factory) -> Path:
    source = tiny_checkpoint_factory("llama")
    return make_sentencepiece_folder(source, tmp_path_factory.mktemp("sp") / "llama-2-style")


def test_sentencepiece_only_tokenizer_loads_and_matches_sentencepiece(sentencepiece_folder):
    import sentencepiece

    assert not (sentencepiece_folder / "tokenizer.json").exists()
    tokenizer = load_tokenizer(sentencepiece_folder)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    text = "Hello! How are you today?"
    ids = tokenizer(text)["input_ids"]
    assert ids == [1, *reference.encode(text)]  # BOS first, as Llama 2 does
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id == 2


def test_sentencepiece_folder_runs_the_model(sentencepiece_folder):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([load_tokenizer(sentencepiece_folder)("What is the capital of France?")["input_ids"]])
    head = load_client_parts(sentencepiece_folder)
    model = AutoModelForCausalLM.from_pretrained(sentencepiece_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = head.logits(load_block_span(sentencepiece_folder, 0, 4)(head.embed(ids)))
        assert (ours - model(ids).logits).abs().max() < 1e-4


def test_missing_sentencepiece_says_what_to_install(sentencepiece_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # an import of it now fails
    with pytest.raises(ModelError, match="pip install sentencepiece"):
        load_tokenizer(sentencepiece_folder)
