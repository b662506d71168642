"""A few rows times a weight matrix (fp32, CPU, one thread) by a small C kernel built on this machine.

A decode step or a short speculative round is bound by reading the weights. MKL's and oneDNN's products read
them at 60-70% of the rate one core streams memory here (a 1024-wide Llama layer's four products, one row:
oneDNN 19.5-21 GB/s, `sum()` over the same tensors 30-32 GB/s), because they read several weight rows side
by side. `native/few_rows.c` reads each weight row as one sequential stream and dots it with every row of x
while the weight row sits in L1. The products alone, one thread, weights in 2 MiB pages, ms (2-core AMD EPYC
with AVX-512, quiet, the kernel's AVX-512 build; `bench/round_cost.py --kernels` times the same on SmolLM2's
spans):

    products                               kernel    1 row   2 rows   3 rows   4 rows   6 rows   8 rows
    8 layers, hidden 1024 (bench model)    native     13.6     17.4     21.4     27.6     46.8     56.1
                                           oneDNN     18.9     31.6     33.3     35.0     36.9     41.2
                                           MKL        25.0     24.9     36.3     48.3     67.8     74.4
    SmolLM2's 30 layers (hidden 576)       native     19.7     18.9     27.1     30.3     38.2     55.6
                                           oneDNN     33.4     42.3     45.7     48.8     53.5     56.1
                                           MKL        26.7     25.1     40.0     38.9     61.8     66.6

(MKL: weight @ rows.T, one row padded to two.) From 6 rows on the kernel re-reads each weight row from L1
for every further 4 rows and oneDNN's blocking catches up, which is why the fixed rule stops at 5 and the
step tuner (step_tuner.py) measures.

The kernel is compiled once per machine with the system's C compiler (`cc -O3 -march=native`, on x86 with
`-mno-avx512f`: a vector is one AVX2 or NEON register, or SSE's) into the user cache and loaded with ctypes;
its results are checked against fp64 products before first use. Vectors one register wide matter: the first
builds used 16-float vectors everywhere, which AVX2 holds in two registers each, and the spills made that
build 1.3-4x slower than MKL from 2 rows on. `bench/native_widths.py` builds the widths this CPU runs
(SmolLM2's products, 4 KiB pages, ms, here, one run):

    build                                  1 row   2 rows   3 rows   4 rows   6 rows   8 rows
    engine (-march=native -mno-avx512f)     20.4     22.6     24.2     27.9     31.1     51.2
    -march=native (AVX-512 here)            21.8     22.1     29.9     33.2     35.2     53.7
    AVX2 (-march=haswell)                   18.9     20.5     24.0     25.7     31.1     45.6
    SSE2 (-march=x86-64)                    19.5     21.2     30.3     35.0     50.9     75.4
    MKL                                     24.1     23.5     37.0     39.1     58.0     63.8
    AVX2 with 16-float vectors (before)     31.6     60.6     88.9    107.0    162.1    211.1  (another run)

Without a compiler, or with POLLINATE_NATIVE_KERNELS=0, `available()` is False and the products keep
torch's kernels (few_rows.py). The sums may differ from MKL's or oneDNN's in the last bits (~1e-6
relative), as those differ from each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from engine import envs, paths

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "few_rows.c"
# On x86, AVX-512 is left out on purpose: with it the kernel's products took 5-19% longer here at 3-8 rows
# (and 1 row) than without it, on the same CPU (bench/native_widths.py). Elsewhere (ARM: NEON) the flag is
# unknown, so it is not passed. The last set: a compiler that knows no -march=native.
_X86 = platform.machine().lower() in ("x86_64", "amd64")
NATIVE_FLAGS = ("-O3", "-march=native", "-mno-avx512f") if _X86 else ("-O3", "-march=native")
FLAG_SETS = (NATIVE_FLAGS, ("-O3",))
BUILD_TIMEOUT_S = 120


class _Kernel:
    def __init__(self, library: ctypes.CDLL):
        self.library = library  # keeps the shared object loaded
        self.function = library.pollinate_few_rows
        self.function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
        self.function.restype = None


_LOCK = threading.Lock()
_STATE: dict[str, _Kernel | None] = {}


def available() -> bool:
    """Whether the native kernel is built, loaded and checked (builds it on the first call: ~0.2 s here, once
    per machine; later processes load the cached build)."""
    if "kernel" not in _STATE:
        with _LOCK:
            if "kernel" not in _STATE:
                _STATE["kernel"] = _load() if envs.native_kernels_enabled() else None
    return _STATE["kernel"] is not None


def linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` for fp32 CPU `rows` [n, inputs] and a row-major `weight` [outputs, inputs]
    (`available()` must be True; callers check eligibility: few_rows.py)."""
    rows = rows.contiguous()
    if weight.shape[1] != rows.shape[1] or not weight.is_contiguous():
        raise ValueError(f"weight {tuple(weight.shape)} must be contiguous [outputs, {rows.shape[1]}]")
    return _product(_STATE["kernel"], rows, weight)


def _product(kernel: _Kernel, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's `rows @ weight.T` (both contiguous fp32, checked by the caller)."""
    (count, inputs), outputs = rows.shape, weight.shape[0]
    out = torch.empty(count, outputs, dtype=torch.float32)
    kernel.function(weight.data_ptr(), rows.data_ptr(), out.data_ptr(), outputs, inputs, count)
    return out


def _load() -> _Kernel | None:
    """Build (or find the cached build of) the kernel for this machine, load it and check it."""
    compiler = _compiler()
    if compiler is None:
        logger.info("No C compiler found: short CPU steps use torch's kernels (slower by up to ~30%)")
        return None
    source = SOURCE.read_bytes()
    for flags in FLAG_SETS:
        target = _cache_path(compiler, flags, source)
        try:
            if not target.exists():
                _build(compiler, flags, target)
            kernel = _Kernel(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError) as error:
            logger.debug("native kernel with %s not used: %s", " ".join(flags), error)
            continue
        if _matches_torch(kernel):
            return kernel
        logger.warning(
            "native kernel built with %s gave wrong results; using torch's kernels", " ".join(flags)
        )
        return None
    logger.info("The native few-row kernel could not be built with %s; using torch's kernels", compiler)
    return None


def _compiler() -> str | None:
    configured = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "").split(" ")[0]
    for name in (configured, "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _cache_path(compiler: str, flags: tuple[str, ...], source: bytes) -> Path:
    """Where this source, built by this compiler with these flags for this CPU, is cached: -march=native
    code must not run on another CPU (a cache directory on a shared or copied home)."""
    key = hashlib.sha256()
    for part in (source, compiler.encode(), " ".join(flags).encode(), _cpu_identity().encode()):
        key.update(part + b"\0")
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return paths.cache_dir() / "kernels" / f"few_rows-{key.hexdigest()[:16]}{suffix}"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (Linux), or what platform knows elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
    return "\n".join(lines[name] for name in wanted if name in lines)


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (x86 Linux; empty elsewhere)."""
    identity = _cpu_identity()
    return set(identity.split("flags", 1)[1].split()) if "flags" in identity else set()


def build_at(flags: tuple[str, ...], target: Path) -> _Kernel:
    """Build the kernel with `flags` (and this machine's compiler) to `target` and load it, unchecked and
    uncached: for benches and tests of builds the engine itself would not make here."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found")
    _build(compiler, flags, target)
    return _Kernel(ctypes.CDLL(str(target)))


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile to a temporary file next to `target`, then rename it: servers starting together on one
    machine may build at once, and a loader must never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        command = [compiler, *flags, "-shared", "-fPIC", "-o", temporary, str(SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip()[-500:] or f"exit {result.returncode}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _matches_torch(kernel: _Kernel) -> bool:
    """Check the kernel on shapes that take every path (1-9 rows, a width with a remainder) against fp64."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 203, generator=generator)
    for count in (1, 2, 3, 4, 5, 9):
        rows = torch.randn(count, 203, generator=generator)
        expected = (rows.double() @ weight.double().t()).float()
        if not torch.allclose(_product(kernel, rows, weight), expected, rtol=1e-4, atol=1e-4):
            return False
    return True
