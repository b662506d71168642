"""Swarm generation speed: greedy tokens/s and prefill latency, local transformers vs swarms of 1 and 2 peers.

Builds a tiny random llama checkpoint in a temporary folder, then generates the same greedy continuation of
one prompt (a) with transformers' `generate` in this process (the baseline), (b) through a swarm of one
server holding all blocks and (c) through two servers holding half the blocks each. Servers run as
`python -m engine.cli serve` child processes on 127.0.0.1 (or in this process with --in-process). The table
gives medians over --repeats runs, each ratio against the baseline measured in the same run, and whether the
swarm's tokens equal the local ones.

    python bench/swarm_generation.py [--blocks 8] [--hidden 256] [--prompt-tokens 64] [--new-tokens 32]
        [--repeats 3] [--device cpu|cuda] [--dtype float32] [--quant none|int8|nf4] [--in-process]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Nothing here needs the network: the checkpoint is made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


@dataclass(frozen=True)
class Timing:
    """One greedy generation: seconds to the first new token (prefill), total seconds, and the tokens."""

    first_token_s: float
    total_s: float
    tokens: torch.Tensor  # [new_tokens]


@dataclass(frozen=True)
class Row:
    name: str
    prefill_s: float
    tokens_per_s: float
    match: str


class _TimingStreamer:
    """A transformers streamer that notes when each new token arrives (its first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_local(model, ids: torch.Tensor, new_tokens: int, device: str) -> Timing:
    """Greedy `generate` of transformers, timed per token with a streamer."""
    streamer = _TimingStreamer()
    _sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=streamer,
        )
    _sync(device)
    total = time.perf_counter() - started
    return Timing(streamer.times[0] - started, total, output[0, ids.shape[1] :].cpu())


def time_swarm(remote, ids: torch.Tensor, new_tokens: int) -> Timing:
    """Greedy generation through the swarm (no eos: always `new_tokens` tokens), timed per token."""
    from engine.client.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, eos_token_id=None)
    started = time.perf_counter()
    tokens, first = [], None
    for step in remote.generate_stream(ids, params):
        if first is None:
            first = time.perf_counter() - started
        tokens.append(step.tokens[0])
    total = time.perf_counter() - started
    return Timing(first, total, torch.stack(tokens).cpu())


def measure(
    name: str, run: Callable[[], Timing], repeats: int, expected: torch.Tensor | None, note: str
) -> Row:
    """Run once to warm up (not counted), then `repeats` times; medians of prefill and decode speed."""
    run()
    timings = [run() for _ in range(repeats)]
    new_tokens = len(timings[0].tokens)
    # Decode speed excludes the prefill: tokens after the first over the time they took.
    speeds = [(new_tokens - 1) / (t.total_s - t.first_token_s) for t in timings if new_tokens > 1]
    if expected is None:
        match = "baseline"
    else:
        same = all(torch.equal(t.tokens, expected) for t in timings)
        match = "yes" if same else f"no{note}"
    return Row(name, statistics.median(t.first_token_s for t in timings), statistics.median(speeds), match)


@contextlib.contextmanager
def swarm(path: Path, spans: Sequence[tuple[int, int]], args, prefix: str) -> Iterator[list[str]]:
    """Servers for `spans`, the first starting a new swarm; yields the multiaddrs to join it."""
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    with contextlib.ExitStack() as stack:
        peers: list[str] = []
        for start, end in spans:
            if args.in_process:
                from engine.server.testing import running_server

                host = stack.enter_context(
                    running_server(
                        path,
                        peers,
                        new_swarm=not peers,
                        start_block=start,
                        end_block=end,
                        dht_prefix=prefix,
                        device=args.device,
                        dtype=dtype,
                        quant=args.quant,
                    )
                )
                maddrs = [str(a) for a in host.dht.get_visible_maddrs()]
            else:
                from engine.server.testing import running_server_process

                server = stack.enter_context(
                    running_server_process(
                        path,
                        peers,
                        *("--blocks", f"{start}:{end}", "--dht-prefix", prefix),
                        *("--device", args.device, "--dtype", dtype, "--quant", args.quant),
                    )
                )
                maddrs = server.multiaddrs
            peers = peers or maddrs
        yield peers


def connect(path: Path, peers: list[str], prefix: str, timeout: float = 60.0):
    """A client model that has seen every block in the swarm (servers announce shortly after start)."""
    from engine.client.model import DistributedModelForCausalLM

    remote = DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=peers, dht_prefix=prefix)
    deadline = time.monotonic() + timeout
    while True:
        try:
            remote.generate(torch.tensor([[5, 6]]), max_new_tokens=1)
            return remote
        except Exception:
            if time.monotonic() > deadline:
                remote.close()
                raise
            time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="transformer blocks of the tiny llama")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny llama")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setup (after one warm-up)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument(
        "--quant", choices=("none", "int8", "nf4"), default="none", help="servers' quantization"
    )
    parser.add_argument("--in-process", action="store_true", help="servers in this process, not children")
    args = parser.parse_args()
    if args.blocks < 2:
        parser.error("--blocks must be >= 2 (the 2-server swarm splits them)")
    dtype_name = args.dtype or ("float16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from engine.models.tiny import build_tiny_checkpoint

    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(
            Path(tmp) / "llama",
            "llama",
            num_layers=args.blocks,
            hidden_size=args.hidden,
            max_shard_size="20MB",
        )
        local = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        vocab = local.config.vocab_size
        ids = torch.randint(5, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        baseline = measure(
            "local transformers",
            lambda: time_local(local, ids, args.new_tokens, args.device),
            args.repeats,
            None,
            "",
        )
        expected = time_local(local, ids, args.new_tokens, args.device).tokens
        # Tokens may legitimately differ when the servers quantize or compute in half precision.
        note = "" if args.quant == "none" and dtype_name == "float32" else f" ({args.quant}, {dtype_name})"

        rows = [baseline]
        half = args.blocks // 2
        for name, spans in (
            ("swarm, 1 server", [(0, args.blocks)]),
            ("swarm, 2 servers", [(0, half), (half, args.blocks)]),
        ):
            prefix = f"bench-{len(spans)}"
            with swarm(path, spans, args, prefix) as peers:
                remote = connect(path, peers, prefix)
                try:
                    rows.append(
                        measure(
                            name,
                            lambda r=remote: time_swarm(r, ids, args.new_tokens),
                            args.repeats,
                            expected,
                            note,
                        )
                    )
                finally:
                    remote.close()

    servers = "in-process" if args.in_process else "child processes"
    print(
        f"tiny llama: {args.blocks} blocks, hidden {args.hidden}; prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new (greedy, batch 1); device {args.device}, {dtype_name}, servers' quant "
        f"{args.quant}; servers as {servers}; median of {args.repeats}; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    header = (
        f"{'setup':<20}{'prefill ms':>12}{'x base':>8}{'decode tok/s':>14}{'x base':>8}  tokens equal local"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<20}{row.prefill_s * 1000:>12.1f}{row.prefill_s / baseline.prefill_s:>8.2f}"
            f"{row.tokens_per_s:>14.1f}{row.tokens_per_s / baseline.tokens_per_s:>8.2f}  {row.match}"
        )
    return 0 if all(row.match in ("baseline", "yes") or note for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
