"""`pollinate-engine run` as a child process for tests: started, waited for until ready, always killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def engine_process(data_dir: Path, *args: str, timeout: float = 90.0):
    """`pollinate-engine run` in a new process group; yields (process, state, client); always killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"  # never touch the developer's keyring
    command = [sys.executable, "-m", "engine.cli", "run", "--port", "0", "--data-dir", str(data_dir), *args]
    log = open(data_dir / "engine.log", "w")  # noqa: SIM115 - closed below, after the process ends
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state_path = data_dir / "engine-state.json"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, (data_dir / "engine.log").read_text()
            assert time.monotonic() < deadline, (
                "engine did not become ready: " + (data_dir / "engine.log").read_text()
            )
            if state_path.exists():
                state = json.loads(state_path.read_text())
                token = Path(state["token_file"]).read_text().strip()
                client = httpx.Client(
                    base_url=state["base_url"], headers={"Authorization": f"Bearer {token}"}
                )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/api/status").json()["ready"]:
                        break
                client.close()
            time.sleep(0.2)
        client.token = token
        yield process, state, client
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        assert not state_path.exists(), "a clean shutdown removes the state file"
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def engine_status(client: httpx.Client) -> dict:
    """The engine's `/api/status` record."""
    return client.get("/api/status").json()


def wait_for_status(client: httpx.Client, predicate, timeout: float, context=lambda: "") -> dict:
    """Poll `/api/status` until `predicate(status)`; fail after `timeout` s with it and `context()`."""
    deadline = time.monotonic() + timeout
    while True:
        status = engine_status(client)
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"status did not change in {timeout} s: {status}{context()}"
        time.sleep(0.1)
