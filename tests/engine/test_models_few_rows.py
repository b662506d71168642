"""few_rows_linear (engine/models/few_rows.py) computes what nn.functional.linear computes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from engine.models.few_rows import FEW_ROWS, few_rows_linear


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 3), (1, FEW_ROWS), (1, FEW_ROWS + 1), (2, 40), (7,)])
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


def test_other_dtypes_and_gradients_take_linear():
    weight = torch.randn(8, 4, dtype=torch.float64)
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    assert torch.equal(few_rows_linear(x, weight), functional.linear(x, weight))
    trained = torch.randn(8, 4, requires_grad=True)
    hidden = torch.randn(1, 2, 4, requires_grad=True)
    few_rows_linear(hidden, trained).sum().backward()
    assert trained.grad is not None and hidden.grad is not None
