"""BLOOM family (ALiBi positions: a per-head linear bias instead of rotary embeddings; LayerNorms with bias).

The client normalizes the embeddings (word_embeddings_layernorm) before block 0, as Petals' client does, so
the hidden states on the wire are the same for Petals and Pollinate peers.
"""

from engine.models.registry import ModelFamily, register_family
from engine.swarm.keys import default_dht_prefix

BLOOM = register_family(
    ModelFamily(
        model_type="bloom",
        modeling_module="transformers.models.bloom.modeling_bloom",
        decoder_layer_class="BloomBlock",
        rotary_embedding_class="",  # ALiBi: no rotary embedding
        norm_class="torch.nn.LayerNorm",
        dht_prefix_rule=lambda repo: default_dht_prefix(repo, "bloom"),  # Petals: owner kept + "-petals"
        block_prefix_template="transformer.h.{index}.",
        embed_key="transformer.word_embeddings.weight",
        norm_key="transformer.ln_f.weight",
        positions="alibi",
        attn_implementation="eager",  # the alibi bias is added to the scores by BLOOM's own attention
        norm_eps_attribute="layer_norm_epsilon",
        norm_has_bias=True,
        embed_norm_key="transformer.word_embeddings_layernorm.weight",
        optional_prefix="transformer.",  # bigscience/bloom* repos: "h.0.", "word_embeddings.weight", ...
    )
)
