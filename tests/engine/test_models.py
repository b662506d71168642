"""Block spans and the client head reproduce the Hugging Face model exactly (every family; fp32)."""

from __future__ import annotations

import pytest
import torch

from engine.models import CacheOverflowError, load_block_span, load_client_parts

EXACT = 1e-5  # fp32, same kernels: only summation order can differ
LOGITS = 1e-4


@pytest.fixture(scope="module")
def reference_cache():
    return {}


@pytest.fixture
def reference(tiny_checkpoint, reference_cache):
    """(checkpoint, HF model, token ids [2, 9], HF outputs: per-block hidden states pre-norm, logits)."""
    if tiny_checkpoint not in reference_cache:
        reference_cache[tiny_checkpoint] = _reference(tiny_checkpoint)
    return reference_cache[tiny_checkpoint]


def _reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    outputs = []
    # Hooks capture each block's raw output: HF's hidden_states[-1] is taken after the final norm.
    base = model.base_model
    layers = base.layers if hasattr(base, "layers") else base.h  # BLOOM and Falcon call them "h"
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in layers]
    with torch.no_grad():
        logits = model(ids).logits
    for hook in hooks:
        hook.remove()
    block_outputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
    return path, ids, block_outputs, logits


def _close(actual, expected, tolerance=EXACT):
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"max abs error {error:.3g} > {tolerance}"


def test_full_span_matches_hf_blocks_and_logits(reference):
    path, ids, block_outputs, logits = reference
    head = load_client_parts(path)
    span = load_block_span(path, 0, 4)
    with torch.no_grad():
        hidden = span(head.embed(ids))
        _close(hidden, block_outputs[-1])
        _close(head.logits(hidden), logits, LOGITS)


def test_chained_spans_match_hf(reference):
    path, ids, block_outputs, _ = reference
    head = load_client_parts(path)
    first, second = load_block_span(path, 0, 2), load_block_span(path, 2, 4)
    assert (first.start, first.end, first.num_blocks) == (0, 2, 2)
    with torch.no_grad():
        middle = first(head.embed(ids))
        _close(middle, block_outputs[1])
        _close(second(middle), block_outputs[3])


def test_prefill_then_decode_with_chained_caches_matches_full_forward(reference):
    path, ids, block_outputs, _ = reference
    head = load_client_parts(path)
    spans = [load_block_span(path, 0, 2), load_block_span(path, 2, 4)]
    caches = [span.new_cache(batch_size=2, max_length=16) for span in spans]
    embeddings = head.embed(ids)
    outputs = []
    for start, end in [(0, 5), (5, 6), (6, 7), (7, 9)]:  # prefill, two single tokens, then two at once
        hidden = embeddings[:, start:end]
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.step(hidden, cache)
        outputs.append(hidden)
    _close(torch.cat(outputs, dim=1), block_outputs[-1])
    assert [cache.length for cache in caches] == [9, 9]


def test_hypo_ids_reorder_the_cache(reference):
    path, ids, _, _ = reference
    head, span = load_client_parts(path), load_block_span(path, 0, 4)
    embeddings = head.embed(ids)
    cache = span.new_cache(batch_size=2, max_length=16)
    span.step(embeddings[:, :6], cache)
    # Both rows continue from row 1's history (beam search keeps hypothesis 1), with different tokens.
    new_tokens = embeddings[:, 6:8]
    stepped = span.step(new_tokens, cache, hypo_ids=torch.tensor([1, 1]))
    history = embeddings[[1, 1], :6]
    with torch.no_grad():
        expected = span(torch.cat([history, new_tokens], dim=1))[:, 6:]
    _close(stepped, expected)


def test_truncate_rolls_back(reference):
    path, ids, _, _ = reference
    head, span = load_client_parts(path), load_block_span(path, 0, 4)
    embeddings = head.embed(ids)
    cache = span.new_cache(batch_size=2, max_length=12)
    span.step(embeddings[:, :7], cache)
    cache.truncate(3)
    replacement = embeddings.flip(1)[:, :4]  # different tokens at positions 3..6
    stepped = span.step(replacement, cache)
    with torch.no_grad():
        expected = span(torch.cat([embeddings[:, :3], replacement], dim=1))[:, 3:]
    _close(stepped, expected)
    with pytest.raises(ValueError):
        cache.truncate(8)


def test_cache_overflow_is_a_clear_error(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    span = load_block_span(path, 1, 3)
    cache = span.new_cache(batch_size=1, max_length=4)
    span.step(torch.randn(1, 3, span.config.hidden_size), cache)
    with pytest.raises(CacheOverflowError, match="max_length 4"):
        span.step(torch.randn(1, 2, span.config.hidden_size), cache)
    assert cache.length == 3  # the failed step changed nothing
    span.step(torch.randn(1, 1, span.config.hidden_size), cache)
    with pytest.raises(ValueError, match="batch"):
        span.step(torch.randn(2, 1, span.config.hidden_size), span.new_cache(1, 4))


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"sliding_window": 4}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    ],
    ids=["mistral", "qwen2-mixed-layers"],
)
def test_sliding_window_attention_matches_hf(tiny_checkpoint_factory, arch, overrides):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory(arch, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head, span = load_client_parts(path), load_block_span(path, 0, 4)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    embeddings = head.embed(ids)
    with torch.no_grad():
        expected = model(ids).logits
        _close(head.logits(span(embeddings)), expected, LOGITS)
    # Decoding past the window: we keep every position and mask the old ones, HF drops them; same result.
    cache = span.new_cache(batch_size=2, max_length=11)
    steps = [span.step(embeddings[:, :3], cache)]
    steps += [span.step(embeddings[:, i : i + 1], cache) for i in range(3, 11)]
    _close(head.logits(torch.cat(steps, dim=1)), expected, LOGITS)


def test_cache_is_passed_under_the_name_the_layer_accepts():
    from engine.models.span import _cache_argument_of

    class NewStyleLayer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None): ...

    class OldStyleLayer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None): ...

    assert _cache_argument_of(NewStyleLayer) == "cache"
    assert _cache_argument_of(OldStyleLayer) == "past_key_values"


def test_head_logits_for_a_few_rows_equal_nn_linear(tiny_checkpoint):
    # The client's LM head takes a faster path for 1..SKINNY_ROWS rows (decode, speculative rounds): same
    # logits as nn.Linear, every shape, and gradients still reach the hidden states (client-side training).
    from engine.models.client_head import SKINNY_ROWS

    head = load_client_parts(tiny_checkpoint)
    torch.manual_seed(0)
    for shape in [(1, 1), (1, 5), (2, 3), (1, SKINNY_ROWS), (1, SKINNY_ROWS + 1), (3, 40)]:
        hidden = torch.randn(*shape, head.config.hidden_size)
        expected = head.lm_head(head.norm(hidden))
        got = head.logits(hidden)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    hidden = torch.randn(1, 2, head.config.hidden_size, requires_grad=True)
    head.logits(hidden).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
