"""The registry of architecture families, keyed by config.model_type.

Each family module (llama.py, mistral.py, ...) describes where transformers keeps the model's own
classes and how the checkpoint names its tensors; it registers itself here when
`engine.models.families` imports it. Adding a family is one new module plus one import line.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.models.errors import UnsupportedModelError

# The dht_prefix rules live with the other DHT key conventions (engine/swarm/keys.py): one rule for the
# registry and the swarm layer. Re-exported for the family modules.
from engine.swarm.keys import (  # noqa: F401
    generic_dht_prefix,
    hf_suffixed_dht_prefix,
    owner_kept_dht_prefix,
)

_FAMILIES: dict[str, ModelFamily] = {}


@dataclass(frozen=True)
class ModelFamily:
    """How to build and load one architecture family from transformers' own modelling classes.

    Class names are resolved lazily in `modeling_module`, so importing the registry stays cheap.
    """

    model_type: str
    modeling_module: str  # e.g. "transformers.models.llama.modeling_llama"
    decoder_layer_class: str  # e.g. "LlamaDecoderLayer", built as cls(config, layer_idx)
    rotary_embedding_class: str  # the model's own rotary embedding, built as cls(config=config)
    norm_class: str  # the model's final norm, built as cls(hidden_size, eps=config.rms_norm_eps)
    dht_prefix_rule: Callable[[str], str] = generic_dht_prefix
    block_prefix_template: str = "model.layers.{index}."
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    lm_head_key: str = "lm_head.weight"
    # Keys some checkpoints carry inside a block that the layer class no longer has (old saved buffers).
    ignored_block_keys: tuple[str, ...] = field(default=("self_attn.rotary_emb.inv_freq",))
    # How blocks learn positions: "rotary" (position embeddings from rotary_emb) or "alibi" (BLOOM's bias).
    positions: str = "rotary"
    # The attention kernel the family needs (None: SDPA, as the model itself picks); BLOOM's alibi: "eager".
    attn_implementation: str | None = None
    # Keyword arguments every block call takes besides the usual ones (Falcon's layer needs alibi=None).
    extra_layer_kwargs: tuple[tuple[str, object], ...] = ()
    # Final norm (client side): the config field holding its epsilon, and whether it has a bias (LayerNorm).
    norm_eps_attribute: str = "rms_norm_eps"
    norm_has_bias: bool = False
    # A LayerNorm the client applies right after the embeddings (BLOOM's word_embeddings_layernorm).
    embed_norm_key: str | None = None
    # Key/value heads of one attention layer when config.num_key_value_heads does not say (Falcon).
    kv_heads: Callable[[object], int] | None = None
    # Turns one block's checkpoint tensors (names without the block prefix) into the layer's own names,
    # e.g. Mixtral's per-expert w1/w2/w3 into transformers 5's fused expert tensors.
    convert_block_state: Callable[[dict, object], dict] | None = None

    # A prefix some checkpoints of the family leave off every key but the LM head's: BLOOM's hub repos were
    # saved from the base model ("h.0.", "word_embeddings.weight"), transformers 5 saves "transformer.h.0.".
    optional_prefix: str | None = None

    def for_checkpoint(self, has_key: Callable[[str], bool]) -> ModelFamily:
        """This family with its key names as the checkpoint spells them (`has_key(name)` asks it)."""
        if self.optional_prefix is None or has_key(self.embed_key):
            return self

        def strip(key: str | None) -> str | None:
            return None if key is None else key.removeprefix(self.optional_prefix)

        return dataclasses.replace(
            self,
            block_prefix_template=strip(self.block_prefix_template),
            embed_key=strip(self.embed_key),
            norm_key=strip(self.norm_key),
            embed_norm_key=strip(self.embed_norm_key),
        )

    def _resolve(self, name: str):
        if "." in name:  # a fully qualified name such as "torch.nn.LayerNorm"
            module, _, attribute = name.rpartition(".")
            return getattr(importlib.import_module(module), attribute)
        return getattr(importlib.import_module(self.modeling_module), name)

    @property
    def decoder_layer(self) -> type:
        """transformers' decoder-layer class for this family."""
        return self._resolve(self.decoder_layer_class)

    @property
    def rotary_embedding(self) -> type:
        """transformers' rotary embedding class for this family."""
        return self._resolve(self.rotary_embedding_class)

    @property
    def norm(self) -> type:
        """The family's final norm class (RMSNorm, or LayerNorm for BLOOM/Falcon), for the client."""
        return self._resolve(self.norm_class)

    def final_norm(self, config, hidden_size: int):
        """An empty final norm as the model builds it (weights are loaded by the client head)."""
        return self.norm(hidden_size, eps=getattr(config, self.norm_eps_attribute))

    def default_dht_prefix(self, repo_id: str) -> str:
        """The DHT prefix Petals 2.2 derives from a repo id (so Petals peers and we share blocks)."""
        return self.dht_prefix_rule(repo_id)

    def dht_prefix_for(self, config, model_id: str) -> str:
        """The prefix a checkpoint's blocks use: its config.json's `dht_prefix` if it has one (Petals reads
        that field first, and its client requires it for a local folder), else the one derived from the id.
        """
        stored = getattr(config, "dht_prefix", None)
        return stored if isinstance(stored, str) and stored.strip() else self.default_dht_prefix(model_id)

    def block_prefix(self, index: int) -> str:
        """Name prefix of block `index`'s tensors in the checkpoint, e.g. "model.layers.3."."""
        return self.block_prefix_template.format(index=index)

    def attention_kind(self, config, index: int) -> str:
        """Attention kind of block `index`: "full_attention" or "sliding_attention", as the model has it."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return layer_types[index]
        return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family to the registry; registering a model_type twice is a programming error."""
    if family.model_type in _FAMILIES:
        raise ValueError(f"model type {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    """The config.model_type values that have an adapter, sorted."""
    _ensure_families_loaded()
    return tuple(sorted(_FAMILIES))


def family_for(config) -> ModelFamily:
    """The family adapter for a transformers config (or a model_type string)."""
    _ensure_families_loaded()
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported types: {', '.join(sorted(_FAMILIES))}"
        )
    return family


def _ensure_families_loaded() -> None:
    # Imported here, not at the top, because the family modules import this one to register.
    import engine.models.families  # noqa: F401
