"""Qwen2 / Qwen2.5 family (attention with q/k/v biases; per-layer sliding windows via config.layer_types)."""

from engine.models.registry import ModelFamily, generic_dht_prefix, register_family

# Petals 2.2 has no Qwen2 adapter; we use its generic rule (repo name without owner, "." -> "-").
QWEN2 = register_family(
    ModelFamily(
        model_type="qwen2",
        modeling_module="transformers.models.qwen2.modeling_qwen2",
        decoder_layer_class="Qwen2DecoderLayer",
        rotary_embedding_class="Qwen2RotaryEmbedding",
        norm_class="Qwen2RMSNorm",
        dht_prefix_rule=generic_dht_prefix,
    )
)
