"""Falcon family (7B/40B/180B: parallel attention and MLP, rotary positions, multi-query or grouped KV).

Falcon checkpoints with ALiBi positions (config.alibi, only some early models) are refused: Petals does not
serve them either.
"""

from engine.models.errors import UnsupportedModelError
from engine.models.registry import ModelFamily, register_family
from engine.swarm.keys import default_dht_prefix


def falcon_kv_heads(config) -> int:
    """KV heads of FalconAttention's cache: transformers 5 caches the new architecture's grouped keys
    expanded to every query head (Petals 2.2 keeps them grouped; the cache never goes on the wire), one head
    for multi-query, all heads otherwise."""
    if getattr(config, "alibi", False):
        raise UnsupportedModelError("Falcon checkpoints with ALiBi positions are not supported")
    if config.multi_query and not config.new_decoder_architecture:
        return 1
    return config.num_attention_heads


FALCON = register_family(
    ModelFamily(
        model_type="falcon",
        modeling_module="transformers.models.falcon.modeling_falcon",
        decoder_layer_class="FalconDecoderLayer",
        rotary_embedding_class="FalconRotaryEmbedding",
        norm_class="torch.nn.LayerNorm",
        dht_prefix_rule=lambda repo: default_dht_prefix(repo, "falcon"),
        block_prefix_template="transformer.h.{index}.",
        embed_key="transformer.word_embeddings.weight",
        norm_key="transformer.ln_f.weight",
        extra_layer_kwargs=(("alibi", None),),
        norm_eps_attribute="layer_norm_epsilon",
        norm_has_bias=True,
        kv_heads=falcon_kv_heads,
    )
)
