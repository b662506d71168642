"""The native few-row kernel built for each vector width this CPU runs, against torch's kernels.

The engine builds engine/models/native/few_rows.c for the machine it runs on, so a bench of the engine shows
only this CPU's instructions. A user's CPU may have others: most gaming PCs have AVX2 (8 floats per
register), not AVX-512. This builds the kernel as the engine does (`engine`: native_linear.NATIVE_FLAGS),
with all of this CPU's instructions (`native`: `-march=native`, AVX-512 where there is one), and for
AVX-512 (`-march=skylake-avx512`), AVX2 (`-march=haswell`) and SSE2 (`-march=x86-64`) where the CPU can run
each, and times SmolLM2's 30 layers of products (7 per layer, its real shapes, random weights) with each,
MKL (`weight @ rows.T`, one row padded to two) and oneDNN (`linear`), one thread. Rows take turns within
each repeat; the table holds medians in ms.

    python bench/native_widths.py [--rows 1 2 3 4 6 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.models import native_linear  # noqa: E402

# SmolLM2-135M's products per layer: q, k, v, o, gate, up, down ([outputs, inputs]).
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30
# x86 builds: name, -march target, the /proc/cpuinfo flags its code needs.
TARGETS = [
    ("avx512", "-march=skylake-avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ("avx2", "-march=haswell", {"avx2", "fma"}),
    ("sse2", "-march=x86-64", set()),
]


def _builds(folder: Path) -> dict[str, native_linear._Kernel]:
    if native_linear._compiler() is None:
        sys.exit("no C compiler found: nothing to build")
    # what the engine builds first, and -march=native with AVX-512 (the engine's choice leaves it out)
    targets = [("engine", native_linear.NATIVE_FLAGS), ("native", ("-O3", "-march=native"))]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = native_linear.cpu_flags()
        targets += [(name, ("-O3", march)) for name, march, needs in TARGETS if needs <= flags]
    kernels = {}
    for name, build_flags in targets:
        library = folder / f"few_rows-{name}.so"
        kernel = native_linear.build_at(build_flags, library)
        if not native_linear._matches_torch(kernel):
            sys.exit(f"the {name} build gave wrong results")
        kernels[name] = kernel
    return kernels


def _ways(kernels: dict[str, native_linear._Kernel]) -> dict[str, Callable]:
    def native(kernel):
        return lambda x, w: native_linear._product(kernel, x, w)

    def mkl(x, w):
        return (w @ (x if x.shape[0] > 1 else torch.cat([x, x])).t()).t()

    ways = {name: native(kernel) for name, kernel in kernels.items()}
    ways.update(mkl=mkl, onednn=torch.nn.functional.linear)
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=generator) * 0.05 for o, i in LAYER_SHAPES * LAYERS]
    inputs = {i: {k: torch.randn(k, i, generator=generator) for k in args.rows} for i in (576, 1536)}
    with tempfile.TemporaryDirectory() as folder:
        ways = _ways(_builds(Path(folder)))
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for rows in args.rows:
                for name, way in ways.items():
                    started = time.perf_counter()
                    for weight in weights:
                        way(inputs[weight.shape[1]][rows], weight)
                    times.setdefault((name, rows), []).append(time.perf_counter() - started)
    cpu = native_linear._cpu_identity().splitlines()[0].split(":")[-1].strip()
    print(f"SmolLM2's {LAYERS} layers of products, one thread, ms (median of {args.repeats}); "
          f"load {os.getloadavg()[0]:.2f}; {cpu}")  # fmt: skip
    labels = [f"{rows} row" + ("s" if rows > 1 else "") for rows in args.rows]
    print(f"{'kernel':>8} " + " ".join(f"{label:>10}" for label in labels))
    for name in ways:
        cells = [statistics.median(times[name, rows][1:]) * 1000 for rows in args.rows]
        print(f"{name:>8} " + " ".join(f"{cell:>10.1f}" for cell in cells))


if __name__ == "__main__":
    main()
