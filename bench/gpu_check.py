"""GPU check, one script: host SmolLM2 and a synthetic ~1B Llama on CUDA with none / int8 / nf4 and compare.

For each model it runs local transformers on the GPU in float16 (the baseline: greedy tokens and decode
tokens/s), then for each quantization a BlockHost in this process on the GPU (float16 compute) holding every
block, and Pollinate's client generating through it (embeddings and LM head on CPU in float32, as the client
keeps them). It prints: whether the greedy tokens equal local's (and where they first differ), decode tokens/s
and its ratio to local, and the VRAM the server planned for its weights (`block_weight_bytes`, what hosting
plans with) against what loading them allocated (`torch.cuda.max_memory_allocated` growth), plus the peak
during generation (KV cache and activations included). It also prints what /api/hardware reports here.

    python bench/gpu_check.py [--models smollm2 1b] [--quants none int8 nf4] [--new-tokens 32]

`--device cpu` runs the same steps on the CPU in float32 without memory figures: a smoke test of the
script itself on a machine without a GPU (it measures nothing about GPUs).

Exits 1 when unquantized SmolLM2 does not give local's greedy tokens (int8/nf4 and the random 1B model
may legitimately differ: near-tied logits of random weights flip under any change of kernels). Needs CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # CPU runs: spinning OpenMP threads starve the others

import torch  # noqa: E402

QUANTS = ("none", "int8", "nf4")
# TinyLlama-1.1B's shape with the tiny tokenizer's 512-token vocabulary: ~0.97B parameters, all in blocks.
SYNTHETIC_1B = dict(
    num_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4
)
PROMPT = [{"role": "user", "content": "Tell me about Paris, the capital of France, in a few sentences."}]


@dataclass(frozen=True)
class Result:
    model: str
    quant: str
    tokens_equal: bool
    first_difference: int | None
    tokens_per_s: float
    local_tokens_per_s: float
    planned_bytes: int
    loaded_bytes: int
    peak_bytes: int
    text: str


def first_difference(tokens: list[int], expected: list[int]) -> int | None:
    """Index of the first token that differs (None when equal, including length)."""
    for index, (a, b) in enumerate(zip(tokens, expected, strict=False)):
        if a != b:
            return index
    return None if len(tokens) == len(expected) else min(len(tokens), len(expected))


def prompt_ids(path: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("The quick brown fox")["input_ids"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> int:
    """Forget the peak; return the bytes allocated now (0 on CPU: no allocator statistics)."""
    gc.collect()
    if device != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def _dtype(device: str) -> torch.dtype:
    return torch.float16 if device == "cuda" else torch.float32


@torch.no_grad()
def local_baseline(path: Path, ids: list[int], new_tokens: int, device: str) -> tuple[list[int], float]:
    """Greedy tokens and decode tokens/s of transformers on the device (float16 on the GPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(device)).to(device).eval()
    inputs = torch.tensor([ids], device=device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False)  # stops at EOS, as the swarm run does
    model.generate(inputs, max_new_tokens=2, do_sample=False)  # warm-up
    _sync(device)
    started = time.perf_counter()
    first = model.generate(inputs, max_new_tokens=1, do_sample=False)
    _sync(device)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    output = model.generate(inputs, **kwargs)
    _sync(device)
    total = time.perf_counter() - started
    del model, first
    _reset_peak(device)
    tokens = output[0, len(ids) :].tolist()
    return tokens, (len(tokens) - 1) / max(total - prefill, 1e-9)


def swarm_run(path: Path, ids: list[int], new_tokens: int, quant: str, prefix: str, device: str):
    """(tokens, decode tokens/s, planned weight bytes, loaded bytes, peak bytes) through one server."""
    from engine.client.generation import stream_generate
    from engine.client.model import DistributedModelForCausalLM
    from engine.client.sampling import SamplingParams
    from engine.models import block_weight_bytes, load_config
    from engine.server.block_host import BlockHost
    from engine.server.config import ServerConfig

    config = load_config(path)
    blocks = config.num_hidden_layers
    planned = block_weight_bytes(config, quant=quant, dtype=_dtype(device)) * blocks
    before = _reset_peak(device)
    server = ServerConfig(
        model=str(path),
        start_block=0,
        end_block=blocks,
        dht_prefix=prefix,
        new_swarm=True,
        host="127.0.0.1",
        device=device,
        dtype=str(_dtype(device)).removeprefix("torch."),
        quant=quant,
        throughput=1.0,
        cache_tokens=len(ids) + new_tokens + 16,  # a small cache: the weights are what is compared
    )
    host = BlockHost(server)
    host.start()
    try:
        loaded = _peak(device) - before
        peers = list(host.info().multiaddrs)
        remote = DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=peers, dht_prefix=prefix, dtype=torch.float32
        )
        try:
            inputs = torch.tensor([ids])
            params = SamplingParams(max_new_tokens=new_tokens, eos_token_id=_eos(config))
            list(stream_generate(remote, inputs, SamplingParams(max_new_tokens=2, eos_token_id=None)))
            first, tokens = None, []
            for step in stream_generate(remote, inputs, params):
                if first is None:
                    first = time.perf_counter()
                tokens.append(int(step.tokens[0]))
            rate = (len(tokens) - 1) / max(time.perf_counter() - first, 1e-9)
        finally:
            remote.close()
        peak = _peak(device) - before
    finally:
        host.stop()
    return tokens, rate, planned, loaded, peak


def _eos(config) -> int | None:
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def model_path(name: str, tmp: Path) -> Path:
    if name == "smollm2":
        from engine.smollm2 import ensure_smollm2

        return ensure_smollm2()
    from engine.models.tiny import build_tiny_checkpoint

    print("building the synthetic ~1B llama (random weights; a minute or two) ...", flush=True)
    return build_tiny_checkpoint(tmp / "llama-1b", "llama", max_shard_size="2GB", **SYNTHETIC_1B)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("smollm2", "1b"), default=["smollm2", "1b"])
    parser.add_argument("--quants", nargs="+", choices=QUANTS, default=list(QUANTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test only")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU; torch sees none here.", file=sys.stderr)
        return 2

    import bitsandbytes
    from transformers.utils import logging as transformers_logging

    from engine import paths
    from engine.api.hardware import probe_hardware

    transformers_logging.disable_progress_bar()
    print("/api/hardware here:", json.dumps(probe_hardware(paths.data_dir()), indent=1))
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, bitsandbytes {bitsandbytes.__version__}, "
        f"device {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU (smoke test, no GPU)'}",
        flush=True,
    )
    results: list[Result] = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = model_path(name, Path(tmp))
            ids = prompt_ids(path)
            expected, local_rate = local_baseline(path, ids, args.new_tokens, args.device)
            for quant in args.quants:
                tokens, rate, planned, loaded, peak = swarm_run(
                    path, ids, args.new_tokens, quant, f"gpu-check-{name}-{quant}", args.device
                )
                difference = first_difference(tokens, expected)
                text = ""
                if name == "smollm2":
                    from transformers import AutoTokenizer

                    text = AutoTokenizer.from_pretrained(path).decode(tokens, skip_special_tokens=True)
                results.append(
                    Result(
                        name,
                        quant,
                        difference is None,
                        difference,
                        rate,
                        local_rate,
                        planned,
                        loaded,
                        peak,
                        text,
                    )
                )
                print(f"  {name} {quant}: done ({rate:.1f} tok/s)", flush=True)
                failed |= name == "smollm2" and quant == "none" and difference is not None

    header = (
        f"{'model':<8}{'quant':<6}{'tokens = local':>15}{'tok/s':>8}{'local':>8}{'x local':>8}"
        f"{'planned MiB':>12}{'loaded MiB':>11}{'peak MiB':>9}"
    )
    dtype = str(_dtype(args.device)).removeprefix("torch.")
    print(f"\ngreedy, {args.new_tokens} new tokens on {args.device}; local transformers and server: {dtype}")
    print(header)
    print("-" * len(header))
    for r in results:
        same = "yes" if r.tokens_equal else f"no (from {r.first_difference})"
        print(
            f"{r.model:<8}{r.quant:<6}{same:>15}{r.tokens_per_s:>8.1f}{r.local_tokens_per_s:>8.1f}"
            f"{r.tokens_per_s / r.local_tokens_per_s:>8.2f}{r.planned_bytes / 2**20:>12.1f}"
            f"{r.loaded_bytes / 2**20:>11.1f}{r.peak_bytes / 2**20:>9.1f}"
        )
    for r in results:
        if r.text:
            print(f"{r.model} {r.quant}: {r.text!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
