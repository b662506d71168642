"""Model adapters: load and run spans of transformer blocks and the client's embeddings and head.

One module per architecture family (llama.py, mistral.py, qwen2.py) registers into registry.py; everything
else is shared and built on transformers' own decoder-layer and rotary-embedding classes.
"""

from engine.models.blocks import block_weight_bytes
from engine.models.cache import SpanCache, cache_bytes
from engine.models.checkpoint import (
    CheckpointReader,
    LoadStats,
    load_config,
    load_tokenizer,
    resolve_checkpoint,
)
from engine.models.client_head import ClientHead, load_client_parts
from engine.models.errors import (
    CacheOverflowError,
    CheckpointError,
    ModelError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from engine.models.quantization import QUANT_TYPES, default_quant
from engine.models.registry import ModelFamily, family_for, register_family, supported_model_types
from engine.models.span import BlockSpan, load_block_span

__all__ = [
    "QUANT_TYPES",
    "BlockSpan",
    "CacheOverflowError",
    "CheckpointError",
    "CheckpointReader",
    "ClientHead",
    "LoadStats",
    "ModelError",
    "ModelFamily",
    "ModelNotFoundError",
    "SpanCache",
    "UnsupportedModelError",
    "block_weight_bytes",
    "cache_bytes",
    "default_quant",
    "family_for",
    "load_block_span",
    "load_client_parts",
    "load_config",
    "load_tokenizer",
    "register_family",
    "resolve_checkpoint",
    "supported_model_types",
]
