"""Large CPU block weights live in memory advised for 2 MiB pages (engine/models/huge_pages.py)."""

from __future__ import annotations

import pytest
import torch

from engine.models import huge_pages, load_block_span

needs_advice = pytest.mark.skipif(not huge_pages.supported(), reason="this OS takes no huge-page advice")


@needs_advice
def test_empty_starts_on_a_huge_page_and_small_tensors_stay_ordinary():
    big = huge_pages.empty((3, 1 << 20), torch.float32)  # 12 MiB
    assert big.shape == (3, 1 << 20) and big.dtype == torch.float32
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    big.fill_(2.0)
    assert big.sum().item() == 2.0 * big.numel()
    small = torch.randn(64, 64)
    assert huge_pages.copy_to_huge_pages(small) is small


@needs_advice
def test_span_weights_move_to_huge_pages_with_the_same_values(tiny_checkpoint_factory, monkeypatch):
    # hidden 512: the MLP's matrices are 2 MiB, enough to be moved; the tiny 64-wide checkpoints are not.
    path = tiny_checkpoint_factory("llama", hidden_size=512, num_layers=2)
    span = load_block_span(path, 0, 2)
    with torch.no_grad():
        reference = {name: p.clone() for name, p in span.named_parameters()}
    mlp = span.blocks[0].mlp
    for weight in (mlp.gate_proj.weight, mlp.down_proj.weight):
        assert weight.untyped_storage().data_ptr() % huge_pages.HUGE_PAGE == 0
    monkeypatch.setattr(huge_pages, "supported", lambda: False)
    original = load_block_span(path, 0, 2)  # weights where the checkpoint reader put them
    assert original.blocks[0].mlp.gate_proj.weight.data_ptr() != mlp.gate_proj.weight.data_ptr()
    for name, param in original.named_parameters():
        assert torch.equal(param, reference[name]), name
    hidden = torch.randn(1, 3, 512)
    with torch.no_grad():
        assert torch.equal(span(hidden), original(hidden))


def test_quantized_or_integer_parameters_are_left_alone():
    module = torch.nn.Module()
    module.codes = torch.nn.Parameter(torch.zeros(4 << 20, dtype=torch.uint8), requires_grad=False)
    before = module.codes.data_ptr()
    huge_pages.move_module_weights(module)
    assert module.codes.data_ptr() == before
