"""`x @ weight.T` for a few rows on the CPU, 1.1-2.5x faster than nn.Linear there.

A decode step or a speculative round multiplies 1 to k + 1 rows by each weight matrix. On this machine's MKL
(torch 2.13 CPU) `nn.Linear` with 2-8 rows is a badly blocked gemm: a SmolLM2 step's 120 products took
65-95 ms for 2 rows against 27-39 ms as `weight @ rows.T`, and one row (a gemv) 41-54 ms against 43 ms
padded to two rows (`bench/README.md`, wan.py, third pass). The products are the same; the summation order
may differ (~1e-6). Other devices, dtypes, gradients and more rows take `nn.functional.linear`.
"""

from __future__ import annotations

import torch
from torch.nn import functional

FEW_ROWS = 8  # at 12 rows and more nn.Linear was as fast or faster


def few_rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, max_rows: int = FEW_ROWS
) -> torch.Tensor:
    """`functional.linear(x, weight, bias)`, computed as weight @ rows.T when x holds 1..max_rows rows."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    eligible = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    if not eligible or not 0 < count <= max_rows or (torch.is_grad_enabled() and weight.requires_grad):
        return functional.linear(x, weight, bias)
    if count == 1:  # one row is a gemv, slower here than the two-row gemm
        rows = torch.cat([rows, rows.new_zeros(rows.shape)])
    out = torch.mm(weight, rows.t()).t()[:count].contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
