"""Deciding what a server runs with: device, dtype, quantization, cache budget, and which blocks to host.

The decisions are pure functions of the config, the model config and measured numbers (free memory, the
swarm's per-block throughput); the few functions that measure are kept apart (free_memory_bytes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from contract import CPU_MEMORY_SHARE
from engine.models.blocks import block_weight_bytes
from engine.models.cache import cache_bytes
from engine.models.quantization import default_quant
from engine.server.config import ServerConfig
from engine.swarm.block_selection import autograd_reserve_bytes, choose_best_blocks, choose_num_blocks

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_MEMORY_FRACTION = CPU_MEMORY_SHARE  # leave the rest of the RAM to the OS, the app and other programs


class PlacementError(RuntimeError):
    """No block fits, or the requested span does not exist in the model."""


def resolve_device(name: str) -> torch.device:
    """The torch device for a config value ("auto" prefers cuda, then mps, then cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PlacementError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def resolve_dtype(name: str, model_config, device: torch.device) -> torch.dtype:
    """The compute dtype: explicit, or "auto" = float32 on CPU, the checkpoint's 16-bit dtype on a GPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = _DTYPES.get(saved.removeprefix("torch."))
    if saved in (torch.float16, torch.bfloat16):
        return saved
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resolve_quant(name: str, device: torch.device) -> str:
    """The weight quantization: explicit, or "auto" = nf4 on CUDA and none elsewhere."""
    return default_quant(device) if name == "auto" else name


def free_memory_bytes(device: torch.device, own_bytes: int = 0) -> int:
    """Memory this server may use on `device`: free GPU memory, or a share of available RAM.

    `own_bytes`: what a running host of ours already holds there (counted as free: it is ours to re-plan).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory torch's caching allocator holds without using it is ours to reuse, not taken by others.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached) + own_bytes)
    import psutil

    return int((psutil.virtual_memory().available + own_bytes) * CPU_MEMORY_FRACTION)


def cache_budget_bytes(config: ServerConfig, model_config, num_blocks: int, dtype: torch.dtype) -> int:
    """The KV-cache budget: config.cache_bytes, or room for cache_tokens tokens in each hosted block."""
    if config.cache_bytes is not None:
        return int(config.cache_bytes)
    return cache_bytes(model_config, num_blocks, 1, config.cache_tokens, dtype)


@dataclass(frozen=True)
class SpanPlan:
    """What to host and what it costs."""

    start: int
    end: int
    weights_bytes: int
    cache_bytes: int

    @property
    def num_blocks(self) -> int:
        """How many blocks the span holds."""
        return self.end - self.start


def plan_num_blocks(config: ServerConfig, model_config, *, free_bytes: int, dtype, quant: str) -> int:
    """How many blocks to host: config.num_blocks, or as many as fit in `free_bytes` with their cache."""
    total = model_config.num_hidden_layers
    if config.num_blocks is not None:
        if config.num_blocks > total:
            raise PlacementError(f"num_blocks {config.num_blocks} is more than the model's {total} blocks")
        return config.num_blocks
    per_block_weights = block_weight_bytes(model_config, quant=quant, dtype=dtype)
    per_block_cache = cache_budget_bytes(config, model_config, 1, dtype) if config.cache_bytes is None else 0
    fixed_cache = config.cache_bytes or 0
    margin = autograd_reserve_bytes(model_config.hidden_size) + fixed_cache
    count = choose_num_blocks(free_bytes, per_block_weights, per_block_cache, total, margin)
    if count < 1:
        need = per_block_weights + per_block_cache + margin
        raise PlacementError(
            f"not even one block fits: one needs about {need / 2**30:.2f} GiB, "
            f"{free_bytes / 2**30:.2f} GiB free; "
            "try --quant nf4/int8, a smaller cache, or another device"
        )
    return count


def plan_span(
    config: ServerConfig, model_config, *, free_bytes: int, dtype, quant: str, block_throughputs=None
) -> SpanPlan:
    """The span to host: config's fixed span, or the weakest part of the swarm for the number that fits."""
    total = model_config.num_hidden_layers
    if config.fixed_span is not None:
        start, end = config.fixed_span
        if end > total:
            raise PlacementError(
                f"blocks {start}:{end} do not exist: the model has {total} blocks (0:{total})"
            )
    else:
        count = plan_num_blocks(config, model_config, free_bytes=free_bytes, dtype=dtype, quant=quant)
        throughputs = list(block_throughputs) if block_throughputs is not None else [0.0] * total
        start, end = choose_best_blocks(count, throughputs)
    weights = block_weight_bytes(model_config, quant=quant, dtype=dtype) * (end - start)
    return SpanPlan(start, end, weights, cache_budget_bytes(config, model_config, end - start, dtype))
