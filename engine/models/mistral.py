"""Mistral family (Mistral 7B and derivatives; sliding-window attention when the config sets it)."""

from engine.models.registry import ModelFamily, generic_dht_prefix, register_family

# Petals 2.2 has no Mistral adapter; we use its generic rule (repo name without owner, "." -> "-").
MISTRAL = register_family(
    ModelFamily(
        model_type="mistral",
        modeling_module="transformers.models.mistral.modeling_mistral",
        decoder_layer_class="MistralDecoderLayer",
        rotary_embedding_class="MistralRotaryEmbedding",
        norm_class="MistralRMSNorm",
        dht_prefix_rule=generic_dht_prefix,
    )
)
