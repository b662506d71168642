"""Qwen3 family (Qwen2's layout plus RMSNorm of queries and keys per head; sliding windows by layer_types)."""

from engine.models.registry import ModelFamily, generic_dht_prefix, register_family

# Petals 2.2 has no Qwen3 adapter; we use its generic rule (repo name without owner, "." -> "-").
QWEN3 = register_family(
    ModelFamily(
        model_type="qwen3",
        modeling_module="transformers.models.qwen3.modeling_qwen3",
        decoder_layer_class="Qwen3DecoderLayer",
        rotary_embedding_class="Qwen3RotaryEmbedding",
        norm_class="Qwen3RMSNorm",
        dht_prefix_rule=generic_dht_prefix,
    )
)
