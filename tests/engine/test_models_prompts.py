"""Deep prompts (Petals semantics) and gradients through a span: what rpc_forward/rpc_backward use."""

from __future__ import annotations

import pytest
import torch

from engine.models import load_block_span


@pytest.fixture(scope="module")
def llama(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama")


def test_prompts_are_added_before_each_block(llama):
    span = load_block_span(llama, 0, 3)
    singles = [load_block_span(llama, index, index + 1) for index in range(3)]
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, span.config.hidden_size, generator=generator)
    prompts = torch.randn(3, 1, 2, span.config.hidden_size, generator=generator)  # batch 1 broadcasts
    with torch.no_grad():
        expected = hidden.clone()
        for single, prompt in zip(singles, prompts, strict=True):
            expected[:, :2] += prompt
            expected = single(expected)
        actual = span(hidden, prompts)
    assert (actual - expected).abs().max() < 1e-5
    # The same prompts through a cached prefill give the same result.
    assert (span.step(hidden, span.new_cache(2, 8), prompts=prompts) - expected).abs().max() < 1e-5
    # An empty tensor means "no prompts" (Petals' dummy tensor).
    with torch.no_grad():
        assert torch.equal(span(hidden, torch.empty(0)), span(hidden))


@pytest.mark.parametrize(
    "shape", [(2, 1, 2, 64), (3, 3, 2, 64), (3, 1, 7, 64), (3, 1, 2, 32), (1, 2, 64)], ids=str
)
def test_bad_prompt_shapes_are_rejected(llama, shape):
    span = load_block_span(llama, 0, 3)
    with pytest.raises(ValueError, match="prompt"):
        span(torch.randn(2, 6, 64), torch.randn(*shape))


def test_forward_is_differentiable_for_inputs_and_prompts(llama):
    span = load_block_span(llama, 1, 3)
    hidden = torch.randn(2, 5, span.config.hidden_size, requires_grad=True)
    prompts = torch.zeros(2, 2, 3, span.config.hidden_size, requires_grad=True)
    span(hidden, prompts).square().sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # Weights are frozen: a server serves backward for inputs and prompts, never trains its blocks.
    assert all(not parameter.requires_grad for parameter in span.parameters())

    # Spot-check the gradient with respect to the input against a finite difference.
    def loss(x):
        return span(x).square().sum().double()

    direction = torch.randn_like(hidden)
    hidden.grad = None
    loss(hidden).backward()
    analytic = (hidden.grad * direction).sum().item()
    epsilon = 1e-2
    with torch.no_grad():
        difference = loss(hidden + epsilon * direction) - loss(hidden - epsilon * direction)
    numeric = difference.item() / (2 * epsilon)
    assert abs(analytic - numeric) <= 1e-2 * max(1.0, abs(numeric))
