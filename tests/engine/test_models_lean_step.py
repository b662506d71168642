"""The lean step path (engine/models/lean_step.py) computes what transformers' decoder layers compute."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.models import load_block_span
from engine.models.few_rows import ONEDNN_ROWS
from engine.models.lean_step import LEAN_STEP_TOKENS, lean_threads, step_mask, step_threads

LEAN_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _steps(span, embeddings, cuts, *, lean: bool, prompts=None, hypo_ids=None):
    """span.step's outputs over embeddings[:, a:b] for consecutive cuts, on the lean path or transformers'."""
    saved = span._lean
    span._lean = saved if lean else None
    try:
        cache = span.new_cache(batch_size=embeddings.shape[0], max_length=embeddings.shape[1])
        outputs = []
        for index, (start, end) in enumerate(itertools.pairwise(cuts)):
            step_prompts = prompts if index == 0 else None
            step_hypo = hypo_ids if index == 2 else None
            outputs.append(span.step(embeddings[:, start:end], cache, step_prompts, step_hypo))
        return torch.cat(outputs, dim=1)
    finally:
        span._lean = saved


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_lean_steps_match_transformers_layers(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    span = load_block_span(path, 1, 4)
    assert span._lean is not None, f"{arch} blocks should take the lean path"
    embeddings = torch.randn(2, 12, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(3, 1, 2, span.config.hidden_size, generator=torch.Generator().manual_seed(1))
    cuts = [0, 4, 5, 6, 9, 10, 12]  # a short prefill, single tokens, a 3-token (speculative) step, ...
    for kwargs in ({}, {"prompts": prompts, "hypo_ids": torch.tensor([1, 0])}):
        lean = _steps(span, embeddings, cuts, lean=True, **kwargs)
        reference = _steps(span, embeddings, cuts, lean=False, **kwargs)
        error = (lean - reference).abs().max().item()
        assert error <= 1e-5, f"{arch} {sorted(kwargs)}: max abs error {error:.3g}"


def test_lean_sliding_window_matches_transformers(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    span = load_block_span(path, 0, 4)  # blocks 0-1 full attention, 2-3 a window of 4
    embeddings = torch.randn(1, 11, span.config.hidden_size, generator=torch.Generator().manual_seed(2))
    cuts = [0, 3, 4, 5, 8, 9, 10, 11]
    lean, reference = _steps(span, embeddings, cuts, lean=True), _steps(span, embeddings, cuts, lean=False)
    assert (lean - reference).abs().max().item() <= 1e-5


def test_joined_weights_are_views_so_memory_and_other_paths_are_unchanged(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    plain = load_block_span(path, 0, 2)
    plain._lean = None
    span = load_block_span(path, 0, 2)
    layer = span._lean[0]
    attn = layer.layer.self_attn
    # q, k and v are consecutive slices of one tensor: no second copy of the weights.
    assert attn.q_proj.weight.untyped_storage().data_ptr() == layer.qkv_weight.untyped_storage().data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == layer.qkv_weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in span.parameters()) == sum(p.numel() for p in plain.parameters())
    hidden = torch.randn(1, 5, span.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(span(hidden), plain(hidden))  # the stateless forward is untouched


def test_replaced_weights_are_joined_again(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    span = load_block_span(path, 0, 2)
    attn = span.blocks[0].self_attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach() * 2, requires_grad=False)
    assert not span._lean[0].current()
    embeddings = torch.randn(1, 6, span.config.hidden_size)
    span.step(embeddings[:, :2], span.new_cache(1, 4))
    assert span._lean[0].current()  # the step joined them again
    lean = _steps(span, embeddings, [0, 3, 4, 6], lean=True)
    assert (lean - _steps(span, embeddings, [0, 3, 4, 6], lean=False)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "falcon", "bloom"])
def test_other_layers_keep_the_transformers_path(tiny_checkpoint_factory, arch):
    assert load_block_span(tiny_checkpoint_factory(arch), 0, 2)._lean is None


def test_step_mask():
    assert step_mask(7, 1, None, "cpu") is None  # one query sees everything
    assert step_mask(3, 1, 4, "cpu") is None  # ... when all keys are inside its window
    assert step_mask(4, 1, 4, "cpu").tolist() == [[False, True, True, True, True]]
    assert step_mask(1, 2, None, "cpu").tolist() == [[True, True, False], [True, True, True]]
    assert step_mask(1, 2, 2, "cpu").tolist() == [[True, True, False], [False, True, True]]
    assert LEAN_STEP_TOKENS >= 8  # speculative steps of a few tokens take the lean path


def test_lean_steps_take_one_thread_where_more_do_not_pay(tiny_checkpoint_factory):
    # MKL's few-row products run on one thread anyway; oneDNN's (6+ rows) may use many idle cores.
    assert lean_threads(1, 16) == lean_threads(ONEDNN_ROWS - 1, 16) == 1
    assert lean_threads(ONEDNN_ROWS, 2) == 1 and lean_threads(ONEDNN_ROWS, 8) == 8
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with step_threads(3):
            seen.append(torch.get_num_threads())
        assert seen == [1] and torch.get_num_threads() == 2  # restored after the step
        span = load_block_span(tiny_checkpoint_factory("llama"), 0, 2)
        cache = span.new_cache(1, 8)
        span.step(torch.randn(1, 3, span.config.hidden_size), cache)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
