"""Turning a GGUF file into an ordinary Hugging Face checkpoint folder (sharded safetensors + tokenizer).

transformers reads GGUF (through the `gguf` package) and dequantizes it, but refuses to save a model it
loaded that way; so the model is rebuilt from its config without the GGUF quantization settings and given
the dequantized weights, which it then saves like any other checkpoint. The rest of the engine only ever
sees the saved folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.models.errors import CheckpointError

Progress = Callable[[float, str], None]

# Fields older readers need (Petals 2.2 pins transformers 4.34, which predates `rope_parameters`/`dtype`).
_LEGACY_ROPE_FIELDS = ("rope_theta",)


def convert_gguf(
    gguf_file: Path,
    out_dir: Path,
    *,
    dtype: str = "float16",
    max_shard_size: str = "100MB",
    extra_config: dict | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the model in `gguf_file` to `out_dir`: sharded safetensors, config, tokenizer, chat template.

    `extra_config` entries are added to config.json (e.g. a `dht_prefix`). Takes ~10 s for a 135M model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report = progress or (lambda _fraction, _message: None)
    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    try:
        with _gguf_parsed_once():
            report(0.05, "reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            report(0.25, "dequantizing the weights")
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot read the GGUF file {gguf_file}: {error}") from error
    report(0.7, "rebuilding the model")
    config = loaded.config
    config._name_or_path = ""  # GGUF metadata's free-text name, not a path or hub id
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    del loaded
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    report(0.8, "writing safetensors shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _patch_config(out_dir / "config.json", dtype, extra_config or {})
    _patch_tokenizer(out_dir, tokenizer.chat_template)
    report(0.95, "checkpoint written")
    return out_dir


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, `gguf` parses a file once and builds each tensor-name map once.

    transformers parses the whole GGUF header for the tokenizer, again for the config and again for the
    weights, and builds gguf's tensor-name map once per module of the model: ~10 of a 135M model's ~20 s
    here, on a user's first start. Both are pure reads. transformers imports `GGUFReader` and
    `get_tensor_name_map` from `gguf` when it calls them, so swapping them on the module reaches it; should
    it stop doing that, this block only stops saving time. Nothing else in the engine reads GGUF meanwhile.
    """
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def reader(path, mode="r"):
        if mode != "r":  # a writable map is never shared
            return real_reader(path, mode)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = real_reader(path)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _patch_config(path: Path, dtype: str, extra: dict) -> None:
    """Add the legacy spellings of new config fields, so older transformers read the folder too."""
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters") or {}
    for field in _LEGACY_ROPE_FIELDS:
        if field in rope and field not in config:
            config[field] = rope[field]
    if rope.get("rope_type", "default") == "default":
        config.setdefault("rope_scaling", None)
    config.setdefault("torch_dtype", dtype)
    config.update(extra)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _patch_tokenizer(folder: Path, chat_template: str | None) -> None:
    """Write the tokenizer files in the forms both transformers 5 and 4.34 (tokenizers 0.14) read.

    New `tokenizers` write BPE merges as pairs, which 0.14 cannot parse; the older "left right" strings are
    read by every version (byte-level BPE tokens hold no spaces, so nothing is lost). 4.34 knows no
    `TokenizersBackend` class and reads the chat template only from tokenizer_config.json.
    """
    tokenizer_file = folder / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") == "BPE" and merges and isinstance(merges[0], list):
        if any(" " in part for pair in merges for part in pair):
            raise CheckpointError("BPE merges hold a space: they cannot be written in the legacy form")
        model["merges"] = [" ".join(pair) for pair in merges]
        tokenizer_file.write_text(json.dumps(data, ensure_ascii=False))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        config.setdefault("chat_template", chat_template)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
