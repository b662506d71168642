"""`x @ weight.T` for a few rows on the CPU, 1.1-2.5x faster than nn.Linear there.

A decode step or a speculative round multiplies 1 to k + 1 rows (a chain or a token tree) by each weight
matrix. Below 6 rows the fastest here is native_linear.py's C kernel where it could be built (SmolLM2's 120
products of one row: 19.7 ms against 26.7 for MKL's best and 33.4 for oneDNN's; its table has the rest).
Without it, on this machine's MKL (torch 2.13 CPU, AMD EPYC) `nn.Linear` with 2-8 rows is a badly blocked
gemm: a SmolLM2 step's 120 products took 65-95 ms for 2 rows against 27-39 ms as `weight @ rows.T`, and one
row (a gemv) 41-54 ms against 43 ms padded to two rows (`bench/README.md`, wan.py, third pass). From 6 rows
on, oneDNN's matmul on the same row-major weight is the fastest (`bench/round_cost.py --kernels`, CPU ms of
the 120 products: 6 rows 47 vs 56, 8 rows 52 vs 59, 12 rows 58 vs 63-100). The products are the same; the
summation order may differ (~1e-6). Other devices, dtypes, gradients and more rows take
`nn.functional.linear`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.nn import functional

from engine.models import native_linear

FEW_ROWS = 16  # the lean step's longest step (LEAN_STEP_TOKENS); above it nn.Linear is as fast
ONEDNN_ROWS = 6  # from this many rows on, oneDNN's matmul beats MKL's gemm as weight @ rows.T


def kernel_for(
    rows: int,
    *,
    max_rows: int = FEW_ROWS,
    onednn: bool = True,
    native: bool = False,
    threads: int = 1,
    preferred: str | None = None,
) -> str:
    """Which kernel computes `rows` rows: "native" (native_linear.py's C kernel, where it is built),
    "pair" (one row padded to two: MKL's two-row gemm beats its gemv), "mm" (weight @ rows.T), "onednn"
    (oneDNN's matmul) or "linear" (nn.functional.linear).

    `preferred` ("native", "mkl" or "onednn", a step tuner's choice: step_tuner.py) overrides the fixed
    rule below. The rule takes the single-threaded native kernel only where the product runs on one thread
    (`threads`, as lean steps of a few rows do): on two, MKL's products of the client's LM head were a little
    faster (SmolLM2, 1 row: 3.9 vs 4.2 ms; 4 rows: 4.0 vs 4.7)."""
    if not 0 < rows <= max_rows:
        return "linear"
    if preferred == "native" and native:
        return "native"
    if preferred == "onednn" and onednn:
        return "onednn"
    if preferred == "mkl":
        return "pair" if rows == 1 else "mm"
    if native and threads == 1 and rows < ONEDNN_ROWS:
        return "native"
    if rows == 1:
        return "pair"
    return "onednn" if onednn and rows >= ONEDNN_ROWS else "mm"


def few_rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, max_rows: int = FEW_ROWS
) -> torch.Tensor:
    """`functional.linear(x, weight, bias)`, computed by the fastest kernel here for x's number of rows."""
    rows = x.reshape(-1, x.shape[-1])
    eligible = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    if not eligible or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)):
        return functional.linear(x, weight, bias)
    preferred = getattr(_PREFERRED, "kernel", None)
    native = weight.is_contiguous() and native_linear.available()
    kernel = kernel_for(
        rows.shape[0],
        max_rows=max_rows,
        onednn=onednn_available(),
        native=native,
        threads=torch.get_num_threads(),
        preferred=preferred,
    )
    if kernel == "linear":
        return functional.linear(x, weight, bias)
    if kernel == "native":
        out = native_linear.linear(rows, weight)
        if bias is not None:
            out += bias
    elif kernel == "onednn":
        out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")
    else:
        count = rows.shape[0]
        if kernel == "pair":
            rows = torch.cat([rows, rows.new_zeros(rows.shape)])
        out = torch.mm(weight, rows.t()).t()[:count].contiguous()
        if bias is not None:
            out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_PREFERRED = threading.local()


@contextlib.contextmanager
def preferred_kernel(kernel: str | None) -> Iterator[None]:
    """Within the block, this thread's few-row products use `kernel` ("mkl" / "onednn"; None: the rule)."""
    before = getattr(_PREFERRED, "kernel", None)
    _PREFERRED.kernel = kernel
    try:
        yield
    finally:
        _PREFERRED.kernel = before


_ONEDNN: list[bool] = []


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear (CPU builds with MKLDNN; checked once)."""
    if not _ONEDNN:
        try:
            probe = torch.ops.mkldnn._linear_pointwise(
                torch.ones(1, 2), torch.ones(3, 2), None, "none", [], ""
            )
            _ONEDNN.append(torch.isclose(probe, torch.full((1, 3), 2.0)).all().item())
        except (AttributeError, RuntimeError):
            _ONEDNN.append(False)
    return _ONEDNN[0]
