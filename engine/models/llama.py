"""Llama family (Llama 2/3, and checkpoints that reuse LlamaForCausalLM such as TinyLlama)."""

from engine.models.registry import ModelFamily, hf_suffixed_dht_prefix, register_family

LLAMA = register_family(
    ModelFamily(
        model_type="llama",
        modeling_module="transformers.models.llama.modeling_llama",
        decoder_layer_class="LlamaDecoderLayer",
        rotary_embedding_class="LlamaRotaryEmbedding",
        norm_class="LlamaRMSNorm",
        dht_prefix_rule=hf_suffixed_dht_prefix,  # Petals 2.2 appends "-hf" for Llama repos
    )
)
