"""Every environment variable the engine reads, in one place, read when asked (never at import)."""

from __future__ import annotations

import os


def data_dir_override() -> str | None:
    """POLLINATE_DATA_DIR: where ledger, demo model and state files live (default: platformdirs)."""
    return os.environ.get("POLLINATE_DATA_DIR") or None


def cache_dir_override() -> str | None:
    """POLLINATE_CACHE_DIR: where throughput measurements and other caches live (default: platformdirs)."""
    return os.environ.get("POLLINATE_CACHE_DIR") or None


def hf_token() -> str | None:
    """HF_TOKEN: a Hugging Face token for gated models (the app stores it in the keyring instead)."""
    return os.environ.get("HF_TOKEN") or None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: resolve hub ids from the local Hugging Face cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def prefer_passive_openmp_threads() -> None:
    """Default OpenMP's idle threads to a short spin, then sleep, before torch loads (the user's own settings
    win): OMP_WAIT_POLICY=PASSIVE and, for GNU OpenMP (torch's on Linux), GOMP_SPINCOUNT=10000 (~0.1 ms).

    OpenMP's default lets idle threads spin for milliseconds: when a server and the client, or two servers,
    share a few cores, the spinning process steals them from the one computing (measured in
    bench/inference.py: a 2-server decode step on 2 cores took 15 ms spinning, 8 ms passive). Fully passive
    threads go to sleep after every parallel region, though, and a step of a few rows is ~30 regions a few
    microseconds apart: each one then waits for its threads to wake up. A 4-block step of a 1024-wide Llama on
    2 threads, 12 ms after the previous one (as a chained server computes), took 14.0 ms passive, 8.2 ms with
    the short spin (and 13.0 ms on one thread); the spin ends ~0.1 ms after a step's last region.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


# GNU OpenMP's spins (about 100 per microsecond) before an idle thread sleeps; see above.
OPENMP_SPIN_COUNT = "10000"


def native_kernels_enabled() -> bool:
    """POLLINATE_NATIVE_KERNELS=0: never build or use the C kernel for short CPU steps (native_linear.py)."""
    return os.environ.get("POLLINATE_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no")


def polite_cpu_watch() -> str | None:
    """POLLINATE_POLITE_CPU_WATCH: count only processes whose command line contains this text as "other
    CPU use" (benches and tests on a shared machine watch their own load generator; unset: all others)."""
    return os.environ.get("POLLINATE_POLITE_CPU_WATCH") or None


def polite_interval() -> float:
    """POLLINATE_POLITE_INTERVAL: seconds between two reads of the politeness detectors (default 2)."""
    try:
        return max(0.1, float(os.environ.get("POLLINATE_POLITE_INTERVAL", "2")))
    except ValueError:
        return 2.0
