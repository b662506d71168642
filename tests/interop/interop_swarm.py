"""Processes of a mixed Petals/Pollinate swarm on 127.0.0.1, as context managers that always clean up.

Every server runs in its own session (process group); leaving the ``with`` block, on success or failure,
sends SIGTERM to the whole group, then SIGKILL to whatever is left. Clients run to completion under a
timeout and are killed the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PETALS_CLIENT_SCRIPT = HERE / "petals_client_script.py"
POLLINATE_CLIENT_SCRIPT = HERE / "pollinate_client_script.py"

SERVER_START_TIMEOUT = 120.0  # both load a 4-block model in seconds; the slack is for busy CI machines
CLIENT_TIMEOUT = 180.0
# A prompt whose greedy continuation on the tiny checkpoint changes token at almost every step, so a wrong
# cache position or a dropped token shows up as a different sequence.
PROMPT = (1, 300, 12, 450, 88)
MAX_NEW_TOKENS = 12

_MADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


class SwarmProcessError(RuntimeError):
    """A server or client of the test swarm failed; the message ends with the tail of its log."""


@dataclass(frozen=True)
class RunningServer:
    name: str
    multiaddrs: tuple[str, ...]
    log: Path


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def base_env(home: Path) -> dict[str, str]:
    """Environment for every swarm process: offline hub, caches under `home`, no way out to the internet.

    Petals servers ask PyPI for the latest version at start: the dead proxy makes that fail at once.
    """
    env = dict(os.environ)
    env.update(
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PETALS_CACHE=str(home / "petals-cache"),
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        NO_PROXY="",
        no_proxy="",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # two CPU cores are shared by several servers and a client
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.pop("PETALS_MAX_RETRIES", None)
    return env


def _kill_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the leader (a graceful stop), then SIGKILL whatever is left of its process group."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children (p2pd, Petals' handler processes) included
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def _server(
    name: str, args: Sequence[str], env: dict[str, str], log: Path, ready: re.Pattern
) -> Iterator[RunningServer]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            list(map(str, args)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while True:
                text = log.read_text(errors="replace")
                if ready.search(text):
                    break
                if process.poll() is not None:
                    raise SwarmProcessError(
                        f"{name} exited with code {process.returncode} before it was ready:\n{_log_tail(log)}"
                    )
                if time.monotonic() > deadline:
                    raise SwarmProcessError(
                        f"{name} not ready after {SERVER_START_TIMEOUT} s:\n{_log_tail(log)}"
                    )
                time.sleep(0.5)
            multiaddrs = tuple(dict.fromkeys(_MADDR.findall(text)))
            if not multiaddrs:
                raise SwarmProcessError(f"{name} printed no 127.0.0.1 multiaddr:\n{_log_tail(log)}")
            yield RunningServer(name, multiaddrs, log)
        finally:
            _kill_group(process)


def petals_server(
    python: Path,
    model: str | Path,
    blocks: tuple[int, int],
    *,
    log: Path,
    home: Path,
    dht_prefix: str | None,
    initial_peers: Sequence[str] = (),
) -> contextlib.AbstractContextManager[RunningServer]:
    """A `petals.cli.run_server` process (Petals venv) hosting `blocks` on 127.0.0.1, CPU, float32."""
    args = [
        python, "-m", "petals.cli.run_server", model,
        "--device", "cpu", "--torch_dtype", "float32", "--quant_type", "none",
        "--throughput", "1",  # a fixed value skips the speed test (no network)
        "--block_indices", f"{blocks[0]}:{blocks[1]}",
        "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
        "--no_auto_relay", "--skip_reachability_check",
        "--num_handlers", "2",
        "--update_period", "10",
    ]  # fmt: skip
    if dht_prefix is not None:  # Petals ignores a local folder's config for the prefix: pass it explicitly
        args += ["--dht_prefix", dht_prefix]
    args += ["--initial_peers", *initial_peers] if initial_peers else ["--new_swarm"]
    return _server("Petals server", args, base_env(home), log, re.compile(r"\] Started$", re.M))


def pollinate_server(
    model: str | Path,
    blocks: tuple[int, int],
    *,
    log: Path,
    home: Path,
    dht_prefix: str | None,
    initial_peers: Sequence[str] = (),
) -> contextlib.AbstractContextManager[RunningServer]:
    """A `python -m engine.cli serve` process (our venv) hosting `blocks` on 127.0.0.1, CPU, float32."""
    args = [
        sys.executable, "-m", "engine.cli", "serve", model,
        "--blocks", f"{blocks[0]}:{blocks[1]}",
        "--host", "127.0.0.1",
        "--device", "cpu", "--dtype", "float32", "--quant", "none",
        "--throughput", "1",
        "--update-period", "10",
    ]  # fmt: skip
    if dht_prefix is not None:
        args += ["--dht-prefix", dht_prefix]
    args += ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
    return _server("Pollinate server", args, base_env(home), log, re.compile(r"^ready", re.M))


def run_client(
    name: str, args: Sequence[str], *, log: Path, home: Path, timeout: float = CLIENT_TIMEOUT
) -> dict:
    """Run a client script to completion; return the JSON object it prints (output_ids, last_logits)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            list(map(str, args)),
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=base_env(home),
            cwd=REPO_ROOT,
            start_new_session=True,
            text=True,
        )
        try:
            stdout, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process, grace=2)
            raise SwarmProcessError(f"{name} timed out after {timeout} s:\n{_log_tail(log)}") from None
        finally:
            _kill_group(process, grace=2)
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SwarmProcessError(
        f"{name} exited with code {process.returncode} without a result:\n{stdout[-2000:]}\n{_log_tail(log)}"
    )


def client_args(
    script: Path, model: str | Path, peers: Sequence[str], prompt: Sequence[int], max_new_tokens: int, **opts
) -> list[str]:
    args = [script, model, "--initial-peers", *peers, "--input-ids", ",".join(map(str, prompt))]
    args += ["--max-new-tokens", str(max_new_tokens)]
    if opts.get("dht_prefix") is not None:
        args += ["--dht-prefix", opts["dht_prefix"]]
    if opts.get("backward"):
        args.append("--backward")
    if opts.get("speculate"):
        args.append("--speculate")
    return list(map(str, args))


def petals_generate(
    python: Path,
    model,
    peers,
    prompt,
    max_new_tokens: int,
    *,
    log: Path,
    home: Path,
    dht_prefix=None,
    backward: bool = False,
) -> dict:
    """Greedy generation and one forward pass by the published Petals client (Petals venv)."""
    args = [
        str(python),
        *client_args(
            PETALS_CLIENT_SCRIPT,
            model,
            peers,
            prompt,
            max_new_tokens,
            dht_prefix=dht_prefix,
            backward=backward,
        ),
    ]
    return run_client("Petals client", args, log=log, home=home)


def pollinate_generate(
    model,
    peers,
    prompt,
    max_new_tokens: int,
    *,
    log: Path,
    home: Path,
    dht_prefix=None,
    backward=False,
    speculate=False,
) -> dict:
    """Greedy generation and one forward pass by Pollinate's client (our venv)."""
    args = [
        sys.executable,
        *client_args(
            POLLINATE_CLIENT_SCRIPT,
            model,
            peers,
            prompt,
            max_new_tokens,
            dht_prefix=dht_prefix,
            backward=backward,
            speculate=speculate,
        ),
    ]
    return run_client("Pollinate client", args, log=log, home=home)


@dataclass(frozen=True)
class Reference:
    """What local transformers (our venv, whole model in one process) computes for PROMPT."""

    output_ids: list[int]
    last_logits: list[float]
    embeds_grad: list[list[float]]


def reference_for(checkpoint: Path) -> Reference:
    """Greedy tokens and last logits of PROMPT by local transformers (no gradient: embeds_grad empty)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    input_ids = torch.tensor([PROMPT])
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        last_logits = model(input_ids).logits[0, -1]
    new_tokens = output[0, len(PROMPT) :].tolist()
    assert len(set(new_tokens)) > len(new_tokens) // 2, f"degenerate reference continuation {new_tokens}"
    return Reference(output[0].tolist(), last_logits.tolist(), [])


def assert_matches_reference(result: dict, reference: Reference) -> None:
    """Same greedy tokens as local transformers, and the same next-token logits up to float noise."""
    import torch

    assert result["output_ids"] == reference.output_ids
    torch.testing.assert_close(
        torch.tensor(result["last_logits"]), torch.tensor(reference.last_logits), atol=1e-3, rtol=1e-3
    )
    if "embeds_grad" in result:
        torch.testing.assert_close(
            torch.tensor(result["embeds_grad"]), torch.tensor(reference.embeds_grad), atol=1e-4, rtol=1e-3
        )


FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def install_in_hub_cache(checkpoint: Path, repo_id: str, home: Path) -> None:
    """Lay `checkpoint` out as huggingface_hub caches `repo_id`, in every cache the processes read.

    That is HF_HOME's hub cache (configs, Pollinate's weights) and PETALS_CACHE, where Petals servers
    look for block weights (both set by base_env under `home`).
    """
    for cache in (home / "hf" / "hub", home / "petals-cache"):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / FAKE_COMMIT
        snapshot.mkdir(parents=True)
        for file in checkpoint.iterdir():
            if file.is_file():
                (snapshot / file.name).write_bytes(file.read_bytes())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(FAKE_COMMIT)
