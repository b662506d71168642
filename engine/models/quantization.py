"""Weight quantization of the linear layers inside blocks with bitsandbytes (int8 or nf4), on CUDA or CPU.

Norms, biases and the KV cache stay in the span's dtype; only nn.Linear weights are quantized. bitsandbytes
quantizes a weight when its module is moved to a device (`.to(device)`), which also works for "cpu".
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_TYPES = ("none", "int8", "nf4")

# Bytes per quantized weight element, including the per-block statistics bitsandbytes stores with it.
# nf4: 4 bits + one 8-bit absmax per 64 weights (double-quantized) + an fp32 absmax per 256 of those.
_NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def default_quant(device: torch.device | str) -> str:
    """nf4 on CUDA (fits 4x the blocks of fp16 at a small accuracy cost), no quantization elsewhere."""
    return "nf4" if torch.device(device).type == "cuda" else "none"


def check_quant(quant: str) -> str:
    """Return `quant` if it is a known quantization type, else raise ValueError naming the options."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    return quant


def quantize_linears(
    module: nn.Module, quant: str, *, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """Replace every nn.Linear inside `module` by its bitsandbytes counterpart and move all to `device`."""
    check_quant(quant)
    if quant == "none":
        return module.to(device=device, dtype=dtype)
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _quantized_linear(bnb, child, quant, dtype))
    # Moving to the device triggers quantization of Int8Params / Params4bit (on CPU as well).
    return module.to(device)


def _quantized_linear(bnb, linear: nn.Linear, quant: str, dtype: torch.dtype) -> nn.Module:
    has_bias = linear.bias is not None
    weight = linear.weight.data.to(dtype)
    if quant == "int8":
        # threshold=0 disables the fp16 outlier path: one code path on every device, as Petals configures it.
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype, quant_type="nf4"
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return new


def linear_weight_bytes(numel: int, out_features: int, quant: str, dtype: torch.dtype) -> int:
    """Bytes one linear weight of `numel` elements occupies at this quantization (an estimate for nf4)."""
    check_quant(quant)
    if quant == "int8":
        return numel + 4 * out_features  # int8 weights + one fp32 scale per output row
    if quant == "nf4":
        return int(numel * _NF4_BYTES_PER_WEIGHT)
    return numel * torch.empty((), dtype=dtype).element_size()
