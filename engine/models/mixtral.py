"""Mixtral family (sparse mixture of experts: each block routes every token to 2 of its experts).

Checkpoints (Mixtral's own and those saved by transformers 5) keep one w1/w2/w3 linear per expert under
`block_sparse_moe.`; transformers 5's MixtralDecoderLayer holds the experts fused (`mlp.experts.gate_up_proj`
[experts, 2 x intermediate, hidden] with gate rows first, `mlp.experts.down_proj`). We fuse on load, as
transformers' own loader does, so a block is built from exactly its tensors.
"""

from __future__ import annotations

import torch

from engine.models.errors import CheckpointError
from engine.models.registry import ModelFamily, register_family
from engine.swarm.keys import default_dht_prefix


def fuse_experts(state: dict, config) -> dict:
    """Per-expert w1 (gate), w3 (up), w2 (down) -> fused gate_up_proj and down_proj; moe gate renamed."""
    if not any(key.startswith("block_sparse_moe.") for key in state):
        return state  # already in the layer's own layout
    fused = {key: value for key, value in state.items() if not key.startswith("block_sparse_moe.")}
    experts = range(config.num_local_experts)
    try:
        gate_up = [torch.cat([state[_expert(e, "w1")], state[_expert(e, "w3")]], dim=0) for e in experts]
        down = [state[_expert(e, "w2")] for e in experts]
        fused["mlp.gate.weight"] = state["block_sparse_moe.gate.weight"]
    except KeyError as missing:
        raise CheckpointError(f"Mixtral block is missing expert tensor {missing}") from None
    fused["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
    fused["mlp.experts.down_proj"] = torch.stack(down)
    leftovers = set(state) - {_expert(e, w) for e in experts for w in ("w1", "w2", "w3")}
    leftovers -= {"block_sparse_moe.gate.weight"}
    leftovers = {key for key in leftovers if key.startswith("block_sparse_moe.")}
    if leftovers:
        raise CheckpointError(f"Mixtral block has tensors of unknown experts: {', '.join(sorted(leftovers))}")
    return fused


def _expert(index: int, name: str) -> str:
    return f"block_sparse_moe.experts.{index}.{name}.weight"


MIXTRAL = register_family(
    ModelFamily(
        model_type="mixtral",
        modeling_module="transformers.models.mixtral.modeling_mixtral",
        decoder_layer_class="MixtralDecoderLayer",
        rotary_embedding_class="MixtralRotaryEmbedding",
        norm_class="MixtralRMSNorm",
        dht_prefix_rule=lambda repo: default_dht_prefix(repo, "mixtral"),  # Petals 2.3: owner kept
        convert_block_state=fuse_experts,
    )
)
