"""Building transformer blocks from transformers' own decoder-layer classes and the checkpoint's tensors."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.checkpoint import CheckpointReader
from engine.models.errors import CheckpointError
from engine.models.quantization import linear_weight_bytes, quantize_linears
from engine.models.registry import ModelFamily, family_for


def prepare_config(config):
    """Pick the attention kernel the model itself would use (SDPA, or the family's) when the config
    leaves it unset."""
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = family_for(config).attn_implementation or "sdpa"
    # Mixture-of-experts layers: the kernel transformers itself picks for a model loaded by from_pretrained.
    if getattr(config, "_experts_implementation", "") is None:
        config._experts_implementation = "grouped_mm"
    return config


def empty_block(family: ModelFamily, config, index: int) -> nn.Module:
    """Block `index` with its parameters on the meta device: shapes only, no memory, no random init."""
    prepare_config(config)  # some layers pick their attention class from the config when built (Falcon)
    with torch.device("meta"):
        return family.decoder_layer(config, layer_idx=index)


def load_block(
    reader: CheckpointReader,
    family: ModelFamily,
    config,
    index: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    quant: str,
) -> nn.Module:
    """Block `index` with its weights read from the checkpoint, cast, quantized and moved to `device`."""
    block = empty_block(family, config, index)
    prefix = family.block_prefix(index)
    keys = [
        key for key in reader.keys_with_prefix(prefix) if key[len(prefix) :] not in family.ignored_block_keys
    ]
    state = {key[len(prefix) :]: tensor.to(dtype) for key, tensor in reader.read(keys).items()}
    if family.convert_block_state is not None:
        state = family.convert_block_state(state, config)
    expected = set(block.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"block {index} is missing tensors {', '.join(prefix + m for m in missing)}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(
            f"block {index} has tensors the {family.decoder_layer_class} does not: {', '.join(unexpected)}"
        )
    block.load_state_dict(state, strict=True, assign=True)
    # Anything still on meta (a buffer the checkpoint does not hold) would fail later, far from the cause.
    leftovers = [name for name, t in (*block.named_parameters(), *block.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"block {index} has uninitialized tensors: {', '.join(leftovers)}")
    block.requires_grad_(False)
    block.eval()
    return quantize_linears(block, quant, dtype=dtype, device=device)


def block_weight_bytes(config, *, quant: str, dtype: torch.dtype) -> int:
    """Bytes of one block's weights at this quantization (linear weights quantized, the rest in dtype)."""
    block = empty_block(family_for(config), config, 0)
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for module in block.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                total += linear_weight_bytes(param.numel(), module.out_features, quant, dtype)
            else:
                total += param.numel() * element
    return total
