"""How fast this machine runs a block, measured once per hardware + model + dtype + quantization and cached.

The announced throughput follows Petals 2.2: forward tokens/s of one block divided by the average number of
hosted blocks a request uses ((n + 1) / 2), capped by the network's tokens/s. We do not run a speed test;
the network is assumed to carry Petals' default of 100 Mbit/s.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from engine import paths
from engine.models.span import BlockSpan

logger = logging.getLogger(__name__)

CACHE_FILE = "throughput_v1.json"
DEFAULT_NETWORK_BITS_PER_SECOND = 100e6  # Petals' fallback when its speed test is unavailable


def device_name(device: torch.device) -> str:
    """A stable name of the compute device, e.g. "NVIDIA H100 80GB HBM3 GPU" or "CPU x86_64 (16 threads)"."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU"
    if device.type == "mps":
        return f"Apple MPS {platform.machine()}"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def cache_key(model: str, device: torch.device, dtype: torch.dtype, quant: str) -> str:
    """The key a measurement is stored under."""
    return (
        f"model={model}|device={device_name(device)}|dtype={str(dtype).removeprefix('torch.')}|quant={quant}"
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_block_rps(span: BlockSpan, *, n_tokens: int, n_steps: int, inference: bool) -> float:
    """Tokens per second through the first block of `span` (with a growing cache when `inference`)."""
    view = BlockSpan(
        span.config,
        span.family,
        span.start,
        [span.blocks[0]],
        dtype=span.dtype,
        device=span.device,
        quant=span.quant,
    )
    hidden = torch.randn(1, n_tokens, span.config.hidden_size, dtype=span.dtype, device=span.device)
    with torch.no_grad():
        cache = view.new_cache(1, n_tokens * (n_steps + 1)) if inference else None
        # The first call warms kernels and allocators up; it is not timed.
        view.step(hidden, cache) if inference else view.forward(hidden)
        _synchronize(view.device)
        started = time.perf_counter()
        for _ in range(n_steps):
            view.step(hidden, cache) if inference else view.forward(hidden)
        _synchronize(view.device)
    return n_steps * n_tokens / max(time.perf_counter() - started, 1e-9)


def measure(span: BlockSpan) -> dict[str, float]:
    """inference_rps, forward_rps and network_rps (tokens/s) of one block on this machine."""
    on_gpu = span.device.type != "cpu"
    forward_tokens = 1024 if on_gpu else 256
    logger.info("Measuring compute throughput once; the result is cached for later runs")
    bits_per_token = span.config.hidden_size * 16  # clients usually send 16-bit activations
    return {
        "inference_rps": measure_block_rps(span, n_tokens=1, n_steps=50 if on_gpu else 10, inference=True),
        "forward_rps": measure_block_rps(
            span, n_tokens=forward_tokens, n_steps=5 if on_gpu else 2, inference=False
        ),
        "network_rps": DEFAULT_NETWORK_BITS_PER_SECOND / bits_per_token,
    }


def server_throughput(info: dict[str, float], num_blocks: int) -> float:
    """The throughput a server announces (Petals' formula) from one block's measurements."""
    average_blocks_used = (num_blocks + 1) / 2
    return min(info["forward_rps"] / average_blocks_used, info["network_rps"])


def get_throughput_info(span: BlockSpan, model: str, *, cache_dir: Path | None = None) -> dict[str, float]:
    """Measurements for this span's hardware/model/dtype/quant: from the cache file, or measured and saved."""
    path = Path(cache_dir or paths.cache_dir()) / CACHE_FILE
    key = cache_key(model, span.device, span.dtype, span.quant)
    cache: dict = {}
    try:
        if path.is_file():
            cache = json.loads(path.read_text())
            if not isinstance(cache, dict):
                cache = {}
    except (OSError, ValueError):
        logger.warning("ignoring unreadable throughput cache %s", path)
        cache = {}
    info = cache.get(key)
    if isinstance(info, dict) and all(
        isinstance(info.get(k), int | float) for k in ("forward_rps", "network_rps")
    ):
        return info
    info = measure(span)
    cache[key] = info
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)  # atomic: two servers measuring at once never leave half a file
    except OSError:
        logger.warning("could not save the throughput cache %s", path, exc_info=True)
    return info
