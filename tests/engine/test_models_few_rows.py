"""few_rows_linear (engine/models/few_rows.py) computes what nn.functional.linear computes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from engine.models.few_rows import FEW_ROWS, ONEDNN_ROWS, few_rows_linear, kernel_for, preferred_kernel


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),
        (1, 2),
        (2, 3),
        (1, ONEDNN_ROWS - 1),
        (1, ONEDNN_ROWS),
        (2, 5),
        (1, FEW_ROWS),
        (1, FEW_ROWS + 1),
        (2, 40),
        (7,),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_equals_linear_for_every_shape(shape, bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=generator)
    x = torch.randn(*shape, 32, generator=generator)
    b = torch.randn(48, generator=generator) if bias else None
    got = few_rows_linear(x, weight, b)
    expected = functional.linear(x, weight, b)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", range(1, FEW_ROWS + 1))
@pytest.mark.parametrize("kernel", [None, "native", "mkl", "onednn"])
def test_every_kernel_within_float32_rounding_of_linear_at_model_sizes(rows, kernel):
    # SmolLM2's widest products (joint gate/up 3072 x 576, down 576 x 1536): the rule's kernel for every
    # row count, and each kernel a step tuner may prefer (where this machine has it).
    generator = torch.Generator().manual_seed(rows)
    for out_features, in_features in [(3072, 576), (576, 1536)]:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        x = torch.randn(1, rows, in_features, generator=generator)
        expected = functional.linear(x, weight)
        with preferred_kernel(kernel):
            torch.testing.assert_close(few_rows_linear(x, weight), expected, rtol=1e-5, atol=2e-5)


def test_kernel_choice_by_rows():
    # with the native kernel built: it up to ONEDNN_ROWS - 1 rows, oneDNN from there
    assert [kernel_for(r, native=True) for r in range(1, ONEDNN_ROWS)] == ["native"] * (ONEDNN_ROWS - 1)
    assert kernel_for(ONEDNN_ROWS, native=True) == "onednn"
    assert kernel_for(1, native=True, threads=2) == "pair"  # a product on 2 threads: MKL's
    assert kernel_for(1) == "pair"  # without it: MKL's two-row gemm beats its gemv
    assert [kernel_for(r) for r in range(2, ONEDNN_ROWS)] == ["mm"] * (ONEDNN_ROWS - 2)
    assert {kernel_for(r) for r in range(ONEDNN_ROWS, FEW_ROWS + 1)} == {"onednn"}
    assert kernel_for(ONEDNN_ROWS, onednn=False) == "mm"  # a torch without oneDNN
    assert kernel_for(0) == kernel_for(FEW_ROWS + 1) == kernel_for(3, max_rows=2) == "linear"


def test_other_dtypes_and_gradients_take_linear():
    weight = torch.randn(8, 4, dtype=torch.float64)
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    assert torch.equal(few_rows_linear(x, weight), functional.linear(x, weight))
    trained = torch.randn(8, 4, requires_grad=True)
    hidden = torch.randn(1, 2, 4, requires_grad=True)
    few_rows_linear(hidden, trained).sum().backward()
    assert trained.grad is not None and hidden.grad is not None
    frozen = torch.randn(8, 4)
    hidden = torch.randn(1, ONEDNN_ROWS, 4, requires_grad=True)  # only the input needs a gradient
    few_rows_linear(hidden, frozen).sum().backward()
    assert hidden.grad is not None
