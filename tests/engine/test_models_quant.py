"""int8 and nf4 block spans (bitsandbytes) run on CPU; their error against fp32 is measured and bounded.

Measured on the tiny 4-block llama (hidden 64, random weights at std 0.08), batch 2 x 12 tokens, relative
error = ||quantized - fp32|| / ||fp32|| of the span output (bitsandbytes 0.50.2, torch 2.13 CPU):
    int8: 0.017 hidden, 0.018 logits (greedy token agrees at 96% of positions)
    nf4:  0.24 hidden, 0.28 logits (each nf4 weight alone is off by 9%; random tiny blocks compound it)
Real checkpoints lose far less (trained weights, wide layers); these bounds catch a broken code path.
"""

from __future__ import annotations

import pytest
import torch

from engine.models import load_block_span, load_client_parts

TOLERANCE = {"int8": 0.05, "nf4": 0.40}  # relative error bound, about twice the measured values above


@pytest.fixture(scope="module")
def fp32_reference(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    head = load_client_parts(path)
    ids = torch.randint(0, head.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = head.embed(ids)
    with torch.no_grad():
        output = load_block_span(path, 0, 4)(hidden)
    return path, head, hidden, output


def _relative(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_runs_on_cpu_within_tolerance(fp32_reference, quant):
    path, head, hidden, expected = fp32_reference
    span = load_block_span(path, 0, 4, quant=quant)
    assert span.quant == quant
    with torch.no_grad():
        output = span(hidden)
        hidden_error = _relative(output, expected)
        logits_error = _relative(head.logits(output), head.logits(expected))
    print(f"{quant}: relative error hidden {hidden_error:.4f}, logits {logits_error:.4f}")
    assert hidden_error < TOLERANCE[quant]
    assert logits_error < TOLERANCE[quant]
    # The cached path agrees with the stateless one at the same quantization.
    cache = span.new_cache(batch_size=2, max_length=16)
    stepped = torch.cat([span.step(hidden[:, :8], cache), span.step(hidden[:, 8:], cache)], dim=1)
    assert (stepped - output).abs().max() < 1e-4


def test_nf4_equals_fp32_with_dequantized_weights(fp32_reference):
    """nf4 error is only weight rounding: fp32 with the rounded weights gives the same output."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    path, _, hidden, _ = fp32_reference
    quantized = load_block_span(path, 0, 2, quant="nf4")
    dense = load_block_span(path, 0, 2)
    dense_modules = dict(dense.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense_modules[name].weight.data.copy_(weight)
    with torch.no_grad():
        assert (quantized(hidden) - dense(hidden)).abs().max() < 1e-4
