"""What a round of k rows costs: SmolLM2's 30 blocks in 4 spans (bench/wan.py's split), in-process, over WAN.

A speculative round sends k rows (a drafted chain, or a token tree) through every server; it pays only if a
step of several rows costs about what a step of one does. The probe first times the servers' compute alone,
with no wire: each span steps k new rows on top of a cached prompt through `BlockSpan.step` (the lean path
the servers take), then forgets them again (the cache is cut back, as a rejected draft is), so every step
sees the same past. Rows (and --threads / --step-kernels settings) take turns within each repeat, so load that
comes and goes hits every row alike.

Columns: `wall` is the median wall-clock time of one step through all 4 spans, `cpu` the median CPU time of
this process for it (less sensitive to other processes on shared cores), `x` the wall time over the first
row's, `best` the fastest step. `--kernels` also times the products alone (the 120 matrix products of the 30
blocks, on the spans' own weights) for each way of computing them; `--profile K` prints where a step of K
rows spends its time, by operator (torch.profiler). `--wan` then starts 4 of our servers behind bench/wan.py's
relay (25 ms one way each) and times whole rounds of k rows from our client (push on, the LM head included,
each round rolled back to the prompt's end: bench/wan/round_client.py); `--trees` also as k sibling tree rows.

    python bench/round_cost.py [--rows 1 2 3 4 5 6 8 10] [--repeats 15] [--past 64] [--threads 2 [1]]
        [--step-kernels auto [rule native mkl onednn linear]] [--kernels] [--profile K] [--wan [--trees]]
        [--no-steps]

Quote the load average it prints with the numbers: the CPU is shared.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as servers run: idle OpenMP threads must not spin

import torch  # noqa: E402
from torch.nn import functional  # noqa: E402

from engine.models import few_rows, native_linear  # noqa: E402

SPANS = [(0, 8), (8, 15), (15, 22), (22, 30)]  # bench/wan.py's split of SmolLM2 over 4 servers


def load_spans(path: Path, spans: list[tuple[int, int]]):
    from engine.models.span import load_block_span

    return [load_block_span(path, start, end) for start, end in spans]


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def step_all(spans, caches, rows: torch.Tensor) -> torch.Tensor:
    """One step of `rows` new tokens through every span, then forget them (as a rolled-back draft is)."""
    hidden = rows
    for span, cache in zip(spans, caches, strict=True):
        past = cache.length
        hidden = span.step(hidden, cache)
        cache.truncate(past)
    return hidden


# How the steps' products run (--step-kernels): "auto" as a server runs them (each span's step tuner picks a
# kernel and threads per row count from its own steps' times: engine/models/step_tuner.py), "rule" the fixed
# rule (few_rows.kernel_for: the native kernel below 6 rows where it is built, one thread below 6 rows),
# "native" / "mkl" / "onednn" that kernel on exactly --threads threads (native: its products on one thread
# whatever --threads says), "linear" nn.Linear's products.
STEP_KERNELS = ("auto", "rule", "native", "mkl", "onednn", "linear")


def use_step_kernel(spans, kernel: str, threads: int, tuners: dict) -> None:
    """Make the spans' next steps run their products as `kernel` says on `threads` configured threads
    (`tuners` keeps each span's "auto" tuner between turns, so it goes on learning)."""
    from engine.models.step_tuner import StepPlan, StepTuner, step_plans

    torch.set_num_threads(threads)
    few_rows.kernel_for = _RULE if kernel != "linear" else (lambda rows, **_: "linear")
    for index, span in enumerate(spans):
        span.tune_steps = kernel in ("auto", "native", "mkl", "onednn")
        if kernel == "auto":
            plans = step_plans(threads, few_rows.onednn_available(), native_linear.available())
            span._tuner = tuners.setdefault((index, threads), StepTuner(plans))
        elif kernel in ("native", "mkl", "onednn"):
            span._tuner = StepTuner((StepPlan(kernel, threads),))


_RULE = few_rows.kernel_for


def measure_steps(spans, caches, row_counts, repeats: int, hidden_size: int, configs: list) -> dict:
    """{(kernel, threads, k): [(wall, cpu), ...]}: steps of k rows with the products run as `kernel` says
    (STEP_KERNELS) on `threads` threads, for every (kernel, threads) in `configs`, taking turns."""
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(1, k, hidden_size, generator=generator) for k in row_counts}
    times: dict[tuple[str, int], list] = {}
    tuners: dict = {}
    try:
        for repeat in range(repeats + 1):  # the first round warms up (first calls allocate)
            shift = repeat % len(row_counts)
            for k in row_counts[shift:] + row_counts[:shift]:
                for kernel, threads in configs:
                    use_step_kernel(spans, kernel, threads, tuners)
                    sample = timed(lambda k=k: step_all(spans, caches, inputs[k]))
                    if repeat:
                        times.setdefault((kernel, threads, k), []).append(sample)
    finally:
        use_step_kernel(spans, "auto", configs[0][1], tuners)
    for (index, threads), tuner in tuners.items():
        print(f"span {index} ({threads} threads), auto's plans: {tuner.summary()}")
    return times


# --- the products alone, by kernel ---


def _mm(x, weight):
    return torch.mm(weight, x.t()).t()


def _onednn(x, weight):
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


KERNELS = {
    "few_rows": None,  # engine.models.few_rows.few_rows_linear, whatever it chooses
    "linear": lambda x, weight: functional.linear(x, weight),
    "mm": _mm,
    "onednn": _onednn,
    "native": lambda x, weight: native_linear.linear(x, weight),
}


def product_weights(spans) -> list[torch.Tensor]:
    """The four matrices a lean layer multiplies by (joint q/k/v, o, joint gate/up, down), every block."""
    weights = []
    for span in spans:
        for lean in span._lean:
            layer = lean.layer
            weights += [lean.qkv_weight, layer.self_attn.o_proj.weight, lean.gate_up_weight]
            weights.append(layer.mlp.down_proj.weight)
    return weights


def measure_kernels(weights, row_counts, repeats: int) -> dict[tuple[str, int], list]:
    from engine.models.few_rows import few_rows_linear

    kernels = dict(KERNELS, few_rows=few_rows_linear)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        (k, w.shape[1]): torch.randn(k, w.shape[1], generator=generator) for k in row_counts for w in weights
    }
    times: dict[tuple[str, int], list] = {}
    for _ in range(repeats):
        for k in row_counts:
            for name, kernel in kernels.items():

                def run(kernel=kernel, k=k):
                    for weight in weights:
                        kernel(inputs[k, weight.shape[1]], weight)

                times.setdefault((name, k), []).append(timed(run))
    return times


def profile_step(spans, caches, rows: int, hidden_size: int, top: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    inputs = torch.randn(1, rows, hidden_size)
    step_all(spans, caches, inputs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step_all(spans, caches, inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# --- whole rounds over the WAN bench's chain ---


def measure_wan_rounds(
    path: Path, row_counts, repeats: int, delay_ms: float, trees: bool, server_threads: int, logs: Path | None
) -> dict:
    """{"chain" / "tree": {k: [seconds, ...]}}: rounds of k rows through 4 of our servers behind
    bench/wan.py's relay (`delay_ms` one way each), push on, each rolled back (bench/wan/round_client.py)."""
    import tempfile

    from bench.server_step import _wan_helpers  # bench/wan.py, loaded from its file

    wan = _wan_helpers()
    wan.stop_children_on_exit()
    wan.THREADS = server_threads  # base_env's OMP/MKL threads of every process it starts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": wan.CHAT_PROMPTS["question"]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = ",".join(map(str, tokenizer(text)["input_ids"]))
    results = {}
    with tempfile.TemporaryDirectory(prefix="pollinate-rounds-") as tmp_name:
        tmp = Path(tmp_name)
        logs = logs or tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = wan.base_env(tmp)
        dht = [sys.executable, "-m", "engine.cli", "dht", "--host", "127.0.0.1"]
        with wan.spawn("bootstrap peer", dht, env, logs / "bootstrap.log", r"^ready") as text:
            boot = list(dict.fromkeys(wan._MADDR.findall(text)))
            chain = wan.Chain(SPANS)
            relay = [
                sys.executable, "-m", "bench.wan.relay", "--delay-ms", delay_ms,
                *[f"0:{port}" for port in chain.ports],
            ]  # fmt: skip
            with wan.spawn("relay", relay, env, logs / "relay.log", r"^relay ready") as text:
                line = next(ln for ln in text.splitlines() if ln.startswith("relay ready"))
                listening = {int(target): int(port) for port, target in re.findall(r"(\d+)->(\d+)", line)}
                chain.relay_ports = [listening[port] for port in chain.ports]
                with wan.servers("pollinate", chain, path, "rounds", boot, tmp, logs):
                    time.sleep(2)  # let the last announcement reach the bootstrap peer
                    for mode in ["chain", "tree"] if trees else ["chain"]:
                        cmd = [
                            sys.executable, ROOT / "bench" / "wan" / "round_client.py", path,
                            "--initial-peers", *boot, "--dht-prefix", "rounds", "--input-ids", ids,
                            "--rows", *row_counts, "--repeats", repeats,
                        ] + (["--tree"] if mode == "tree" else [])  # fmt: skip
                        out = wan.run_client(f"rounds ({mode})", cmd, env, logs / f"client-{mode}.log")
                        if mode == "tree" and not out["trees"]:
                            print("the servers take no tree steps: no tree rounds", flush=True)
                            continue
                        results[mode] = {int(k): v for k, v in out["rounds"].items()}
    return results


def median_ms(samples: list, which: int) -> float:
    return statistics.median(s[which] for s in samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6, 8, 10])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--past", type=int, default=64, help="tokens already in every span's cache")
    parser.add_argument(
        "--threads", nargs="+", type=int, default=[2], help="compute threads (bench/wan.py's servers: 2)"
    )
    parser.add_argument("--kernels", action="store_true", help="also time the products alone, by kernel")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="K", help="operator profile of a K-row step"
    )
    parser.add_argument(
        "--step-kernels",
        nargs="+",
        default=["auto"],
        choices=STEP_KERNELS,
        help="how the steps' products run: auto (each span's step tuner, as servers run), rule (the fixed "
        "rule before the tuner), mkl or onednn (that kernel on exactly --threads threads), linear "
        "(nn.Linear); several take turns",
    )
    parser.add_argument(
        "--wan",
        action="store_true",
        help="also time whole rounds of k rows through 4 of our servers behind bench/wan.py's relay",
    )
    parser.add_argument("--delay-ms", type=float, default=25.0, help="--wan: one-way delay per server")
    parser.add_argument("--trees", action="store_true", help="--wan: also rounds of k sibling tree rows")
    parser.add_argument("--server-threads", type=int, default=2, help="--wan: compute threads per server")
    parser.add_argument(
        "--logs", type=Path, default=None, help="--wan: keep the process logs here (WAN_DEBUG=1: servers' -v)"
    )
    parser.add_argument("--no-steps", action="store_true", help="skip the in-process steps")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2, prepared once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads[0])

    if args.model:
        path = Path(args.model)
    else:
        from engine.smollm2 import ensure_smollm2

        path = Path(ensure_smollm2())
    loads = [os.getloadavg()[0]]
    steps = kernels = wan_rounds = None
    if not args.no_steps or args.kernels or args.profile:
        spans = load_spans(path, SPANS)
        hidden_size = spans[0].config.hidden_size
        caches = [span.new_cache(1, args.past + max(args.rows) + 1) for span in spans]
        prompt = torch.randn(1, args.past, hidden_size, generator=torch.Generator().manual_seed(2))
        for span, cache in zip(spans, caches, strict=True):
            prompt = span.step(prompt, cache)
    configs = [(kernel, threads) for kernel in args.step_kernels for threads in args.threads]
    if not args.no_steps:
        steps = measure_steps(spans, caches, args.rows, args.repeats, hidden_size, configs)
        torch.set_num_threads(args.threads[0])
        loads.append(os.getloadavg()[0])
    if args.kernels:
        kernels = measure_kernels(product_weights(spans), args.rows, args.repeats)
        loads.append(os.getloadavg()[0])
    if args.wan:
        wan_rounds = measure_wan_rounds(
            path, args.rows, args.repeats, args.delay_ms, args.trees, args.server_threads, args.logs
        )
        loads.append(os.getloadavg()[0])

    print(
        f"\n{path.name}: 30 blocks in spans {SPANS}, fp32, {args.past} cached tokens in-process; median of "
        f"{args.repeats}; load (1 min) " + " | ".join(f"{load:.2f}" for load in loads)
    )
    if steps:
        print("\none step through all 4 spans, in-process; x: wall time over the first row's")
        print(f"{'kernels':>8} {'threads':>7} {'rows':>4} {'wall ms':>8} {'cpu ms':>8} {'x':>6} {'best':>7}")
        one = median_ms(steps[(*configs[0], args.rows[0])], 0)
        for kernel, threads in configs:
            for k in args.rows:
                samples = steps[kernel, threads, k]
                wall, best = median_ms(samples, 0), min(s[0] for s in samples) * 1e3
                cpu = median_ms(samples, 1)
                print(f"{kernel:>8} {threads:>7} {k:>4} {wall:8.1f} {cpu:8.1f} {wall / one:6.2f} {best:7.1f}")
    if wan_rounds:
        print(
            f"\nwhole rounds through 4 servers x {args.delay_ms:g} ms one way, {args.server_threads} threads "
            "each (push on; client's LM head included; rolled back each round): ms"
        )
        print(
            f"{'rows':>4} " + " ".join(f"{mode + ' median':>13} {mode + ' best':>11}" for mode in wan_rounds)
        )
        for k in args.rows:
            cells = []
            for samples in wan_rounds.values():
                cells += [f"{statistics.median(samples[k]) * 1e3:13.1f}", f"{min(samples[k]) * 1e3:11.1f}"]
            print(f"{k:>4} " + " ".join(cells))
    if kernels:
        names = list(KERNELS)
        print("\nthe 120 products alone, wall ms (cpu ms), median")
        print(f"{'rows':>4} " + " ".join(f"{name:>16}" for name in names))
        for k in args.rows:
            cells = [
                f"{median_ms(kernels[name, k], 0):7.1f} ({median_ms(kernels[name, k], 1):5.1f})"
                for name in names
            ]
            print(f"{k:>4} " + " ".join(f"{cell:>16}" for cell in cells))
    if args.profile:
        print(f"\noperators of a {args.profile}-row step (5 steps):")
        print(profile_step(spans, caches, args.profile, hidden_size))


if __name__ == "__main__":
    main()
