"""Decode speed over a WAN: a chain of servers, each behind a delaying relay, Petals vs Pollinate.

Builds (per model) a chain of --servers servers holding equal shares of the blocks, each listening on its own
port and announcing a relay's port instead (bench/wan/relay.py adds --delay-ms one way, both directions), so
every peer that dials a server, client or server, pays the delay; the DHT bootstrap peer stays direct. Then
measures, in one run, greedy generation of batch 1 by:

  (a) the Petals 2.2 client through Petals 2.2 servers (the interop venv, built on first use),
  (b) the Petals 2.2 client through Pollinate servers (it asks them to push to each other),
  (c) Pollinate's client through Pollinate servers: hop by hop (no push), with push, and with push and
      speculative decoding (prompt lookup),

Both kinds of servers stay up for the whole run. Each Petals-client row is one client process; the rows of
our client share one process and take turns (a warm-up of each, then one timed generation of each per
repeat, the order rotating), and with --rounds N the whole set of client processes runs N times in a rotating
order, so the machine's other load falls on every row alike; the table gives each row's median over all its
runs and its fastest run. Every row's tokens are checked against local transformers' greedy tokens (same
weights, same prompt). Beside each measure, a prediction: hop by hop, H servers x RTT + C; with push,
(H + 1) x one-way delay + C (each hop once, then the way back); with speculation, that divided by the
measured tokens per round. Petals 2.2 servers push with the metadata of a session's first message, which
asks for no push, so row (a) is hop by hop. TTFT: the Petals client's first step is not pushed (H x RTT +
prefill); ours is, (H + 1) x delay + prefill, except in c-hop. C and the prefill are local transformers' times
for the whole model, measured here.

    python bench/wan.py [--models synthetic smollm2] [--servers 4] [--delay-ms 25] [--jitter-ms 0]
        [--mbit 0] [--new-tokens 24] [--repeats 3] [--rounds 1]
        [--rows a b c-hop c-push c-spec c-exit c-feat c-feat-tree c-ngram c-ngram-sure c-tree c-tree-line]
        [--prompts ...] [--draft-blocks N] [--logs DIR]

c-exit drafts with the model's own first --draft-blocks blocks on the client (engine.client.early_exit);
c-feat with the trained feature drafter shipped for the model (engine.client.feature_drafter; skipped when
there is none), or the drafter folder --feature-drafter names; c-ngram with the table of the model's own
answers shipped for it (engine.client.ngram_drafter; skipped when there is none); c-tree verifies token trees
of the table's and prompt lookup's candidates in each round (engine.client.draft_tree; prompt lookup's alone
when no table is shipped); c-feat-tree verifies the feature drafter's trees (EAGLE-2 expansion) with prompt
lookup's copies among the candidates; c-tree-line is c-tree with each tree's size priced by one straight line
through the rounds' times (SpeculationConfig.tree_cost="line", the policy before per-size costs), for a paired
comparison; c-ngram-sure is c-ngram with the table's chain before a 1-token copy only with a clear favourite
after 2+ tokens (NgramDrafter table_first="sure", d284824's rule). The other speculative rows draft chains
only.
With several --prompts (real models), each row runs every prompt against the same servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent / "wan"
SERVER_START_TIMEOUT = 300.0
CLIENT_TIMEOUT = 900.0
# ~100M parameters in 8 blocks (hidden 1024), the tiny tokenizer's 512-token vocabulary: the blocks hold
# almost all of it, as they would for a big model; random weights (prompt lookup is mostly rejected there).
SYNTHETIC = dict(num_layers=8, hidden_size=1024, intermediate_size=2816, num_attention_heads=16)
# Chat prompts for real models (--prompts): an ordinary question whose answer runs past --new-tokens (no end
# of turn to generate through; the headline), and an input-grounded one whose answer reuses the prompt's
# words (what prompt lookup is for).
CHAT_PROMPTS = {
    "question": "Explain in a few sentences what a hash table is and why lookups in it are fast.",
    "rewrite": (
        "Rewrite this paragraph in simpler words, keeping its facts: The committee has determined that, "
        "owing to unforeseen budgetary constraints, the construction of the new public library on Elm "
        "Street will be postponed until the subsequent fiscal year, and the existing branch will remain "
        "open with its current hours until the new building is completed."
    ),
}
ROWS = {
    "a": ("Petals client, Petals servers", "petals", "petals", {}),
    "b": ("Petals client, Pollinate servers", "petals", "pollinate", {}),
    "c-hop": ("Pollinate client, no push", "pollinate", "pollinate", {"no_push": True}),
    "c-push": ("Pollinate client, push", "pollinate", "pollinate", {}),
    "c-spec": ("Pollinate client, push + speculation", "pollinate", "pollinate", {"speculate": True}),
    "c-exit": (
        "Pollinate, push + early-exit drafts",
        "pollinate",
        "pollinate",
        {"speculate": True, "exit": True},
    ),
    "c-feat": (
        "Pollinate, push + feature drafts",
        "pollinate",
        "pollinate",
        {"speculate": True, "feature_drafter": "auto"},
    ),
    "c-ngram": (
        "Pollinate, push + n-gram table drafts",
        "pollinate",
        "pollinate",
        {"speculate": True, "ngram_table": "auto"},
    ),
    "c-feat-tree": (
        "Pollinate, push + feature-drafter trees",
        "pollinate",
        "pollinate",
        {"speculate": True, "feature_drafter": "auto", "tree_rows": 8},
    ),
    "c-tree": (
        "Pollinate, push + token trees",
        "pollinate",
        "pollinate",
        {"speculate": True, "ngram_table": "auto", "tree_rows": 8},
    ),
    "c-tree-line": (
        "Pollinate, push + trees, line-priced",
        "pollinate",
        "pollinate",
        {"speculate": True, "ngram_table": "auto", "tree_rows": 8, "tree_cost": "line"},
    ),
    "c-ngram-sure": (
        "Pollinate, push + n-gram, sure first",
        "pollinate",
        "pollinate",
        {"speculate": True, "ngram_table": "auto", "ngram_rule": "sure"},
    ),
}
THREADS = 2  # compute threads per process (--threads): one server computes at a time in a chain
_MADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


# --- processes ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict[str, str]:
    """Offline hub, caches under `home`, THREADS compute threads per process, no internet."""
    env = dict(os.environ)
    env.update(
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PETALS_CACHE=str(home / "petals-cache"),
        HTTP_PROXY="http://127.0.0.1:9",  # Petals servers ask PyPI for the latest version: fail at once
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS),
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONPATH=str(ROOT),
    )
    return env


def stop_children_on_exit() -> None:
    """Nothing a bench starts outlives it: a SIGTERM unwinds through spawn's clean-up, and the engine's
    reaper ends whatever is left after a kill -9 (servers and DHT peers run in sessions of their own)."""
    from engine.lifetime import start_reaper

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start_reaper()


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def spawn(name: str, args: Sequence, env: dict, log: Path, ready: str, cwd: Path = ROOT) -> Iterator[str]:
    """Start a process in its own group in `cwd`; yield its log text once `ready` (a regex) appears."""
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            list(map(str, args)), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while not re.search(ready, text := log.read_text(errors="replace"), re.M):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(text.splitlines()[-30:])
                    raise RuntimeError(f"{name} did not start (see {log}):\n{tail}")
                time.sleep(0.5)
            yield text
        finally:
            _kill_group(process)


def run_client(name: str, args: Sequence, env: dict, log: Path) -> dict:
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            list(map(str, args)), stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=ROOT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, _ = process.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            _kill_group(process)
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"{name} gave no result (exit {process.returncode}; see {log}):\n{tail}")


def petals_python() -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "interop"))
    from petals_env import ensure_petals_env

    return ensure_petals_env()


# --- the swarm ---


@dataclass
class Chain:
    """Where the servers of one kind listen and which relay port each announces."""

    spans: list[tuple[int, int]]
    ports: list[int] = field(default_factory=list)
    relay_ports: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.ports = [free_port() for _ in self.spans]  # the relay's own ports come from the relay


def split_blocks(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(servers)]


@contextlib.contextmanager
def servers(kind: str, chain: Chain, model: Path, prefix: str, boot: list[str], home: Path, logs: Path):
    with contextlib.ExitStack() as stack:
        for index, ((start, end), port, relay) in enumerate(
            zip(chain.spans, chain.ports, chain.relay_ports, strict=True)
        ):
            announce = f"/ip4/127.0.0.1/tcp/{relay}"
            verbose = ["-v"] if os.environ.get("WAN_DEBUG") else []  # debug logs of our servers
            log = logs / f"{prefix}-server{index}.log"
            if kind == "petals":
                args = [
                    petals_python(), "-m", "petals.cli.run_server", model, "--device", "cpu",
                    "--torch_dtype", "float32", "--quant_type", "none", "--throughput", "1",
                    "--block_indices", f"{start}:{end}", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                    "--announce_maddrs", announce, "--no_auto_relay", "--skip_reachability_check",
                    "--num_handlers", "2", "--update_period", "10", "--dht_prefix", prefix,
                    "--initial_peers", *boot,
                ]  # fmt: skip
                ready = r"\] Started$"
            else:
                args = [
                    sys.executable, "-m", "engine.cli", *verbose, "serve", model,
                    "--blocks", f"{start}:{end}", "--host", "127.0.0.1", "--port", port,
                    "--announce-maddrs", announce,
                    "--device", "cpu", "--dtype", "float32", "--quant", "none", "--throughput", "1",
                    "--update-period", "10", "--dht-prefix", prefix, "--initial-peers", *boot,
                ]  # fmt: skip
                ready = r"^ready"
            stack.enter_context(spawn(f"{kind} server {index}", args, base_env(home), log, ready))
        yield


# --- local reference ---


@dataclass(frozen=True)
class Local:
    tokens: list[int]
    prefill_s: float
    step_s: float


def local_reference(model: Path, ids: torch.Tensor, new_tokens: int, repeats: int) -> Local:
    """Local transformers' greedy tokens, prefill and step times (THREADS threads, as every server)."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        prefills, steps = [], []
        for _ in range(repeats + 1):
            with torch.no_grad():
                started = time.perf_counter()
                out = hf(input_ids=ids, use_cache=True)
                prefills.append(time.perf_counter() - started)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
                tokens = [token]
                started = time.perf_counter()
                for _ in range(new_tokens - 1):
                    out = hf(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
                    tokens.append(token)
                steps.append((time.perf_counter() - started) / max(new_tokens - 1, 1))
        return Local(tokens, statistics.median(prefills[1:]), statistics.median(steps[1:]))
    finally:
        torch.set_num_threads(threads)


# --- models ---


def make_petals_compatible(path: Path) -> Path:
    """Legacy config fields transformers 4.34 (Petals 2.2) reads: rope_theta, torch_dtype."""
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    config_path.write_text(json.dumps(config, indent=2))
    return path


def prepare_model(name: str, tmp: Path, prompts: Sequence[str]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint folder and the prompts' ids (by name) for model `name`."""
    if name == "synthetic":
        from engine.models.tiny import build_tiny_checkpoint

        path = build_tiny_checkpoint(tmp / "synthetic", "llama", max_shard_size="200MB", **SYNTHETIC)
        # A prompt with repeats, so prompt lookup has something to propose (it is still mostly rejected).
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        pattern = torch.randint(5, vocab, (8,), generator=torch.Generator().manual_seed(0))
        return make_petals_compatible(path), {"ids": torch.cat([pattern, pattern, pattern[:4]])[None]}
    if name == "tiny":
        from engine.models.tiny import build_tiny_checkpoint

        path = make_petals_compatible(build_tiny_checkpoint(tmp / "tiny", "llama", num_layers=8))
        return path, {"ids": torch.tensor([[1, 30, 12, 45, 88, 30, 12, 45, 88, 30]])}
    if name == "smollm2":
        try:
            from engine.smollm2 import ensure_smollm2
        except ImportError:
            raise SystemExit("smollm2: this checkout cannot prepare SmolLM2 (no engine.smollm2)") from None
        from transformers import AutoTokenizer

        path = Path(ensure_smollm2(tmp / "models"))  # prepared from the installed GGUF (~20 s)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = {}
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": CHAT_PROMPTS[prompt]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids[prompt] = torch.tensor([tokenizer(text)["input_ids"]])
        return path, ids
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--models takes synthetic, smollm2 or a checkpoint folder; got {name!r}")
    return path, {"ids": torch.tensor([[1, 30, 12, 45, 88, 30, 12, 45]])}


def num_blocks_of(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


# --- one model ---


@dataclass
class Row:
    model: str
    key: str
    label: str
    runs: list[dict]
    speculation: dict | None
    tokens_ok: bool
    predicted_step_s: float
    predicted_ttft_s: float

    @property
    def step_s(self) -> float:
        return statistics.median(r["step_s"] for r in self.runs)

    @property
    def best_step_s(self) -> float:
        """The fastest run: what a row can do when the machine's other load leaves it alone."""
        return min(r["step_s"] for r in self.runs)

    @property
    def ttft_s(self) -> float:
        return statistics.median(r["ttft"] for r in self.runs)


def predict(key: str, hops: int, delay: float, local: Local, speculation: dict | None) -> tuple[float, float]:
    """(decode step seconds, TTFT seconds) the simple latency model expects for row `key`."""
    hop_by_hop = hops * 2 * delay + local.step_s
    pushed = (hops + 1) * delay + local.step_s
    step = hop_by_hop if key in ("a", "c-hop") else pushed
    if speculation and speculation.get("tokens_per_round"):
        step /= speculation["tokens_per_round"]
    ours_pushed = ROWS[key][1] == "pollinate" and key != "c-hop"
    first_step = (hops + 1) * delay if ours_pushed else hops * 2 * delay
    return step, first_step + local.prefill_s


def load_average() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().split()[0]
    return "?"


def _client_groups(keys: Sequence[str]) -> list[list[str]]:
    """The rows run by one client process each: every Pollinate-client row together (they take turns per
    repeat in one process, see bench/wan/pollinate_client.py), each Petals-client row alone."""
    ours = [k for k in keys if ROWS[k][1] == "pollinate"]
    groups = [[k] for k in keys if ROWS[k][1] == "petals"]
    return groups + ([ours] if ours else [])


def _pollinate_row_spec(key: str, args) -> dict:
    """A row of ours as pollinate_client.py's --rows takes it: its key and its options."""
    opts = dict(ROWS[key][3])
    if opts.pop("exit", False):
        opts["draft_blocks"] = args.draft_blocks
    if opts.get("feature_drafter") and args.feature_drafter is not None:
        opts["feature_drafter"] = str(Path(args.feature_drafter).resolve())
    return dict(key=key, **opts)


def _shipped_drafter(path: Path) -> Path | None:
    from engine.client.feature_drafter import shipped_drafter_path

    return shipped_drafter_path(Path(path).name)


def _shipped_table(path: Path) -> Path | None:
    from engine.client.ngram_drafter import shipped_table_path

    return shipped_table_path(Path(path).name)


def _run_rows(name, args, path, prompts, chains, tmp, logs, boot) -> list[Row]:
    """Every row for one model, each prompt in turn against the same servers; `prompts`: name -> (ids,
    local reference).

    Both kinds of servers stay up for the whole run, and the rows run --rounds times, in an order rotating
    every round, so that the machine's other load is spread over every row instead of falling on one."""
    env = base_env(tmp)
    keys = list(args.rows)
    for key in ("c-feat", "c-feat-tree"):
        if key in keys and args.feature_drafter is None and _shipped_drafter(path) is None:
            print(f"[{name}] {key} skipped: no feature drafter is shipped for this model", flush=True)
            keys.remove(key)
    for key in ("c-ngram", "c-ngram-sure"):
        if key in keys and _shipped_table(path) is None:
            print(f"[{name}] {key} skipped: no n-gram table is shipped for this model", flush=True)
            keys.remove(key)
    kinds = [kind for kind in ("petals", "pollinate") if any(ROWS[k][2] == kind for k in keys)]
    groups = _client_groups(keys)
    results: dict[tuple[str, str], dict] = {}
    loads = []
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            prefix = f"wan-{name}-{kind}".replace("_", "-")
            stack.enter_context(servers(kind, chains[kind], path, prefix, boot, tmp, logs))
        time.sleep(2)  # let the last announcement reach the bootstrap peer
        for round_ in range(args.rounds):
            loads.append(load_average())
            turn = round_ % len(groups)
            for prompt, (ids, _local) in prompts.items():
                for group in groups[turn:] + groups[:turn]:
                    kind = ROWS[group[0]][2]
                    prefix = f"wan-{name}-{kind}".replace("_", "-")
                    common = [
                        path, "--initial-peers", *boot, "--input-ids", ",".join(map(str, ids[0].tolist())),
                        "--new-tokens", args.new_tokens, "--repeats", args.repeats, "--dht-prefix", prefix,
                    ]  # fmt: skip
                    tag = f"{prompt}-{'+'.join(group)}-round{round_}"
                    labels = ", ".join(ROWS[k][0] for k in group)
                    print(f"[{name}/{prompt}] round {round_ + 1}: {labels} ...", flush=True)
                    if ROWS[group[0]][1] == "petals":
                        cmd = [petals_python(), HERE / "petals_client.py", *common]
                        by_key = {group[0]: run_client(labels, cmd, env, logs / f"{prefix}-{tag}-client.log")}
                    else:
                        specs = json.dumps([_pollinate_row_spec(k, args) for k in group])
                        cmd = [sys.executable, HERE / "pollinate_client.py", *common, "--rows", specs]
                        by_key = run_client(labels, cmd, env, logs / f"{prefix}-{tag}-client.log")["rows"]
                    for key, result in by_key.items():
                        merged = results.setdefault((prompt, key), dict(runs=[], speculation=None))
                        merged["runs"] += result["runs"]
                        merged["speculation"] = _merge_speculation(
                            merged["speculation"], result["speculation"]
                        )
        loads.append(load_average())
    print(
        f"[{name}] load average (1 min) at each round's start and at the end: {' | '.join(loads)}", flush=True
    )

    rows = []
    for prompt, (_ids, local) in prompts.items():
        model = name if prompt == "ids" else f"{name}/{prompt}"
        for key in keys:
            result = results[prompt, key]
            label = ROWS[key][0]
            ok = all(run["tokens"] == local.tokens for run in result["runs"])
            if not ok:
                first = next(run["tokens"] for run in result["runs"] if run["tokens"] != local.tokens)
                pairs = enumerate(zip(first, local.tokens, strict=False))
                where = next((i for i, (a, b) in pairs if a != b), None)
                print(
                    f"[{model}] {label}: tokens differ from local's at position {where}:\n"
                    f"  got   {first}\n  local {local.tokens}",
                    flush=True,
                )
            hops, delay = args.servers, args.delay_ms / 1e3
            step, ttft = predict(key, hops, delay, local, result["speculation"])
            rows.append(Row(model, key, label, result["runs"], result["speculation"], ok, step, ttft))
    return rows


def _merge_speculation(total: dict | None, more: dict | None) -> dict | None:
    """Speculation counters of two sets of runs of one row, added up (rates recomputed)."""
    if more is None or total is None:
        return more if total is None else total
    merged = {k: total[k] + more[k] for k in ("rounds", "drafted", "accepted")}
    merged["tree_rounds"] = total.get("tree_rounds", 0) + more.get("tree_rounds", 0)
    tokens = total["tokens_per_round"] * total["rounds"] + more["tokens_per_round"] * more["rounds"]
    merged["acceptance"] = merged["accepted"] / merged["drafted"] if merged["drafted"] else None
    merged["tokens_per_round"] = tokens / merged["rounds"] if merged["rounds"] else None
    return merged


# --- report ---

HEADER = (
    f"{'model':17} {'setup':38} {'ms/token':>9} {'best':>6} {'pred':>6} {'tok/s':>6} {'x (a)':>6} "
    f"{'TTFT ms':>8} {'pred':>6} {'accept':>7} {'tok/rnd':>7}  tokens"
)


def format_row(row: Row, base: Row) -> str:
    spec = row.speculation or {}
    acceptance = spec.get("acceptance")
    per_round = spec.get("tokens_per_round")
    base_rate = 1 / base.step_s if base.key == "a" else float("nan")
    return (
        f"{row.model:17} {row.label:38} {row.step_s * 1e3:9.1f} {row.best_step_s * 1e3:6.0f} "
        f"{row.predicted_step_s * 1e3:6.0f} "
        f"{1 / row.step_s:6.2f} {(1 / row.step_s) / base_rate:6.2f} {row.ttft_s * 1e3:8.0f} "
        f"{row.predicted_ttft_s * 1e3:6.0f} "
        f"{'-' if acceptance is None else f'{acceptance:.0%}':>7} "
        f"{'-' if per_round is None else f'{per_round:.2f}':>7}"
        f"  {'same' if row.tokens_ok else 'DIFFER'}"
    )


def main(argv: list[str] | None = None) -> int:
    global THREADS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["synthetic"], help="synthetic, smollm2 or a folder")
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay in front of each server")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap per direction (0: none)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per row and round")
    parser.add_argument("--rounds", type=int, default=1, help="passes over all rows (order rotating)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--prompts", nargs="+", default=["question"], choices=list(CHAT_PROMPTS), help="real models' prompts"
    )
    parser.add_argument("--draft-blocks", type=int, default=4, help="c-exit: blocks the client drafts with")
    parser.add_argument(
        "--feature-drafter",
        default=None,
        help="c-feat: a drafter folder (default: the one shipped for the model)",
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="compute threads per process")
    parser.add_argument("--logs", type=Path, default=None, help="keep the process logs here")
    args = parser.parse_args(argv)
    stop_children_on_exit()
    THREADS = args.threads
    if args.servers < 1 or args.new_tokens < 2 or args.repeats < 1 or args.rounds < 1:
        parser.error("need --servers >= 1, --new-tokens >= 2, --repeats >= 1, --rounds >= 1")

    with tempfile.TemporaryDirectory(prefix="pollinate-wan-") as tmp_name:
        tmp = Path(tmp_name)
        logs = args.logs or tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        rows: list[Row] = []
        env = base_env(tmp)
        with spawn(
            "bootstrap peer", [sys.executable, "-m", "engine.cli", "dht", "--host", "127.0.0.1"], env,
            logs / "bootstrap.log", r"^ready",
        ) as text:  # fmt: skip
            boot = list(dict.fromkeys(_MADDR.findall(text)))
            for model in args.models:
                rows += bench_model(model, args, tmp, logs, boot, env)
        print()
        print(
            f"{args.servers} servers x {args.delay_ms:g} ms one way (RTT {2 * args.delay_ms:g} ms)"
            f"{f', jitter {args.jitter_ms:g} ms' if args.jitter_ms else ''}"
            f"{f', {args.mbit:g} Mbit/s' if args.mbit else ''}; {args.new_tokens} new tokens, "
            f"median of {args.rounds} x {args.repeats} runs (each client process warms up first)"
        )
        print(HEADER)
        print("-" * len(HEADER))
        for row in rows:
            base = next((r for r in rows if r.model == row.model and r.key == "a"), row)
            print(format_row(row, base))
    return 1 if any(not row.tokens_ok for row in rows) else 0


def bench_model(model: str, args, tmp: Path, logs: Path, boot: list[str], env: dict) -> list[Row]:
    """Every row for one model: local reference, then one relay in front of both chains of servers."""
    path, prompt_ids = prepare_model(model, tmp, args.prompts)
    blocks = num_blocks_of(path)
    spans = split_blocks(blocks, args.servers)
    prompts = {}
    for prompt, ids in prompt_ids.items():
        local = local_reference(path, ids, args.new_tokens, args.repeats)
        prompts[prompt] = (ids, local)
        print(
            f"[{model}] {blocks} blocks over {args.servers} servers {spans}; prompt {prompt}: {ids.shape[1]} "
            f"tokens; local step {local.step_s * 1e3:.1f} ms, prefill {local.prefill_s * 1e3:.1f} ms",
            flush=True,
        )
    chains = {kind: Chain(spans) for kind in ("petals", "pollinate")}
    routes = [f"0:{port}" for chain in chains.values() for port in chain.ports]
    relay = [
        sys.executable, "-m", "bench.wan.relay", "--delay-ms", args.delay_ms, "--jitter-ms", args.jitter_ms,
        "--mbit", args.mbit, *routes,
    ]  # fmt: skip
    with spawn("relay", relay, env, logs / f"relay-{Path(model).name}.log", r"^relay ready") as text:
        # "relay ready 41234->38001 ...": the ports it listens on (picked by the system: no race for them)
        line = re.search(r"^relay ready .*$", text, re.M).group(0)
        listening = {int(target): int(port) for port, target in re.findall(r"(\d+)->(\d+)", line)}
        for chain in chains.values():
            chain.relay_ports = [listening[port] for port in chain.ports]
        return _run_rows(Path(model).name, args, path, prompts, chains, tmp, logs, boot)


if __name__ == "__main__":
    sys.exit(main())
