"""A server's own overhead on loopback: decode steps through two Pollinate servers vs two Petals 2.2 servers.

One run builds a synthetic llama (--model: 8 blocks, hidden 1024, as bench/wan.py's), starts a bootstrap DHT
peer and, all at once on 127.0.0.1 with no relay, two servers of each kind holding half the blocks each:

  a    the Petals 2.2 client through Petals 2.2 servers (the interop venv, built on first use),
  b    the Petals 2.2 client through Pollinate servers of this checkout,
  b0   the same through Pollinate servers of --baseline REV (that commit, exported to a temporary folder),
  c    Pollinate's client through Pollinate servers of this checkout (c0: of the baseline),

plus, in this process, `local` (transformers, the whole model: one decode step with its LM head) and
`blocks` (only the blocks, as the two servers run them, one span after the other, no wire: the compute a
server step cannot avoid). Rows take turns: --rounds rounds, each running every row's client once (one
warm-up generation, then --repeats timed ones), so load that comes and goes hits every row alike. The table
shows the median decode step (prefill excluded), `x (a)` (row a's step / the row's step: higher is faster),
and the overhead beyond `blocks`. Every row's greedy tokens are checked against local transformers'.

    python bench/server_step.py [--baseline main] [--rounds 3] [--repeats 3] [--new-tokens 32]
        [--rows a b b0 c c0] [--threads 2] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

WAN = ROOT / "bench" / "wan"
SYNTHETIC = dict(num_layers=8, hidden_size=1024, intermediate_size=2816, num_attention_heads=16)
ROWS = {
    "a": ("Petals client, Petals servers", "petals", "petals"),
    "b": ("Petals client, Pollinate servers", "petals", "pollinate"),
    "b0": ("Petals client, Pollinate servers (baseline)", "petals", "baseline"),
    "c": ("Pollinate client, Pollinate servers", "pollinate", "pollinate"),
    "c0": ("Pollinate client, Pollinate servers (baseline)", "pollinate", "baseline"),
}


def _wan_helpers():
    # bench/wan.py sits beside the bench/wan/ package, so it is loaded from its file.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_wan_script", ROOT / "bench" / "wan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


wan = _wan_helpers()


def export_tree(rev: str, dest: Path) -> Path:
    """The files of commit `rev` in `dest` (git archive: the repository itself is not touched)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


@contextlib.contextmanager
def pollinate_servers(tree: Path, spans, model: Path, prefix: str, boot, home: Path, logs: Path, debug=False):
    """Pollinate servers of the checkout at `tree` (their PYTHONPATH and working folder)."""
    env = wan.base_env(home)
    env["PYTHONPATH"] = str(tree)
    with contextlib.ExitStack() as stack:
        for index, (start, end) in enumerate(spans):
            args = [
                sys.executable, "-m", "engine.cli", *(["-v"] if debug else []), "serve", model,
                "--blocks", f"{start}:{end}",
                "--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32", "--quant", "none",
                "--throughput", "1", "--update-period", "10", "--dht-prefix", prefix,
                "--initial-peers", *boot,
            ]  # fmt: skip
            log = logs / f"{prefix}-server{index}.log"
            # In the tree's own folder: baseline servers must import that tree's engine.
            stack.enter_context(wan.spawn(f"{prefix} server {index}", args, env, log, r"^ready", cwd=tree))
        yield


@contextlib.contextmanager
def petals_servers(spans, model: Path, prefix: str, boot, home: Path, logs: Path):
    with contextlib.ExitStack() as stack:
        for index, (start, end) in enumerate(spans):
            port = wan.free_port()
            args = [
                wan.petals_python(), "-m", "petals.cli.run_server", model, "--device", "cpu",
                "--torch_dtype", "float32", "--quant_type", "none", "--throughput", "1",
                "--block_indices", f"{start}:{end}", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                "--no_auto_relay", "--skip_reachability_check", "--num_handlers", "2",
                "--update_period", "10", "--dht_prefix", prefix, "--initial_peers", *boot,
            ]  # fmt: skip
            log = logs / f"{prefix}-server{index}.log"
            server = wan.spawn(f"petals server {index}", args, wan.base_env(home), log, r"\] Started$")
            stack.enter_context(server)
        yield


def blocks_step(model: Path, spans, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median seconds of one decode step through the blocks alone (both spans in turn, no wire, no head)."""
    from transformers import AutoModelForCausalLM

    from engine.models.span import load_block_span

    threads = torch.get_num_threads()
    torch.set_num_threads(wan.THREADS)
    try:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        embed = hf.get_input_embeddings()
        parts = [load_block_span(model, start, end) for start, end in spans]
        steps = []
        for _ in range(repeats + 1):
            caches = [part.new_cache(1, ids.shape[1] + new_tokens) for part in parts]
            with torch.inference_mode():
                hidden = embed(ids)
                for part, cache in zip(parts, caches, strict=True):
                    hidden = part.step(hidden, cache)
                started = time.perf_counter()
                for _ in range(new_tokens - 1):
                    hidden = embed(torch.tensor([[7]]))
                    for part, cache in zip(parts, caches, strict=True):
                        hidden = part.step(hidden, cache)
                steps.append((time.perf_counter() - started) / (new_tokens - 1))
        return statistics.median(steps[1:])
    finally:
        torch.set_num_threads(threads)


def prepare_synthetic(tmp: Path) -> tuple[Path, torch.Tensor]:
    """The synthetic checkpoint (readable by Petals 2.2 too) and a 20-token prompt of random ids."""
    from engine.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp / "synthetic", "llama", max_shard_size="200MB", **SYNTHETIC)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    pattern = torch.randint(5, vocab, (8,), generator=torch.Generator().manual_seed(0))
    return wan.make_petals_compatible(path), torch.cat([pattern, pattern, pattern[:4]])[None]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default=None, help="a git revision whose servers run as rows b0/c0")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3, help="turns of every row (load hits all alike)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per client run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=wan.THREADS, help="compute threads per process")
    parser.add_argument("--logs", type=Path, default=None, help="keep the process logs here")
    parser.add_argument(
        "--server-debug", action="store_true", help="this checkout's servers log at debug level (step times)"
    )
    args = parser.parse_args(argv)
    wan.stop_children_on_exit()
    wan.THREADS = args.threads
    rows = args.rows or [k for k in ROWS if args.baseline or ROWS[k][2] != "baseline"]
    if any(ROWS[k][2] == "baseline" for k in rows) and not args.baseline:
        parser.error("rows b0 / c0 need --baseline REV")
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)", flush=True)

    with tempfile.TemporaryDirectory(prefix="pollinate-step-") as tmp_name:
        tmp = Path(tmp_name)
        logs = args.logs or tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path, ids = prepare_synthetic(tmp)
        blocks = wan.num_blocks_of(path)
        spans = wan.split_blocks(blocks, 2)
        local = wan.local_reference(path, ids, args.new_tokens, args.repeats)
        compute = blocks_step(path, spans, ids, args.new_tokens, args.repeats)
        print(
            f"{blocks} blocks as {spans}; prompt {ids.shape[1]} tokens; "
            f"local step {local.step_s * 1e3:.1f} ms, blocks only {compute * 1e3:.1f} ms",
            flush=True,
        )
        trees = {"pollinate": ROOT}
        if args.baseline:
            trees["baseline"] = export_tree(args.baseline, tmp / "baseline")
        env = wan.base_env(tmp)
        common = [
            path, "--input-ids", ",".join(map(str, ids[0].tolist())), "--new-tokens", args.new_tokens,
            "--repeats", args.repeats,
        ]  # fmt: skip
        results: dict[str, list[dict]] = {key: [] for key in rows}
        loads: list[str] = []
        with wan.spawn(
            "bootstrap peer", [sys.executable, "-m", "engine.cli", "dht", "--host", "127.0.0.1"], env,
            logs / "bootstrap.log", r"^ready",
        ) as text, contextlib.ExitStack() as stack:  # fmt: skip
            boot = list(dict.fromkeys(wan._MADDR.findall(text)))
            kinds = {ROWS[key][2] for key in rows}
            for kind in sorted(kinds):
                prefix = f"step-{kind}"
                print(f"starting {kind} servers ...", flush=True)
                if kind == "petals":
                    stack.enter_context(petals_servers(spans, path, prefix, boot, tmp, logs))
                else:
                    debug = args.server_debug and kind == "pollinate"
                    servers = pollinate_servers(trees[kind], spans, path, prefix, boot, tmp, logs, debug)
                    stack.enter_context(servers)
            time.sleep(3)  # let the last announcements reach the bootstrap peer
            for round_ in range(args.rounds):
                loads.append(load_average())
                for key in rows:
                    label, client, kind = ROWS[key]
                    script = WAN / ("petals_client.py" if client == "petals" else "pollinate_client.py")
                    python = wan.petals_python() if client == "petals" else sys.executable
                    cmd = [python, script, *common, "--initial-peers", *boot, "--dht-prefix", f"step-{kind}"]
                    result = wan.run_client(label, cmd, env, logs / f"{key}-client-{round_}.log")
                    results[key] += result["runs"]
                    step = statistics.median(run["step_s"] for run in result["runs"])
                    print(f"round {round_ + 1}: {label}: {step * 1e3:.1f} ms/step", flush=True)
            loads.append(load_average())

    base = statistics.median(r["step_s"] for r in results["a"]) if "a" in results else None
    header = f"{'setup':48} {'ms/step':>8} {'min':>6} {'x (a)':>6} {'over blocks':>12}  tokens"
    print()
    print(
        f"2 servers x {blocks // 2} blocks (synthetic llama, hidden 1024, fp32, "
        f"{args.threads} threads each), "
        f"loopback, {args.new_tokens} new tokens; median of {args.rounds} rounds x {args.repeats} runs; "
        f"load average per round: {' | '.join(loads)}"
    )
    print(header)
    print("-" * len(header))
    print(f"{'local transformers (whole model)':48} {local.step_s * 1e3:8.1f} {'':>6} {'':>6} {'':>12}  -")
    blocks_label = "blocks only (both spans, no wire, no head)"
    print(f"{blocks_label:48} {compute * 1e3:8.1f} {'':>6} {'':>6} {0:12.1f}  -")
    ok = True
    for key in rows:
        runs = results[key]
        step = statistics.median(r["step_s"] for r in runs)
        fastest = min(r["step_s"] for r in runs)
        same = all(r["tokens"] == local.tokens for r in runs)
        ok &= same
        ratio = f"{base / step:6.2f}" if base else f"{'-':>6}"
        print(
            f"{ROWS[key][0]:48} {step * 1e3:8.1f} {fastest * 1e3:6.1f} {ratio} {(step - compute) * 1e3:12.1f}"
            f"  {'same' if same else 'DIFFER'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
