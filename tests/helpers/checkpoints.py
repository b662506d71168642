"""Test helpers that reshape tiny checkpoints the way older or other tools saved them."""

from __future__ import annotations

import json
from pathlib import Path


def strip_key_prefix(path: Path, prefix: str = "transformer.") -> Path:
    """Rewrite a sharded checkpoint in place without `prefix` on its tensor names, as BLOOM's hub repos
    (saved from the base model: "h.0.", "word_embeddings.weight") have them; the LM head keeps its name."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(path / shard)
        save_file(
            {k.removeprefix(prefix): v for k, v in tensors.items()}, path / shard, metadata={"format": "pt"}
        )
    index["weight_map"] = {k.removeprefix(prefix): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index, indent=1))
    return path
