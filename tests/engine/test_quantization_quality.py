"""Quantization on real weights: SmolLM2-135M-Instruct on the first 256 tokens of bench/data/quality_text.txt.

Stated tolerances (measured on this text with bitsandbytes on CPU, with margin; see bench/README.md): int8
keeps >= 93% of fp32's top-1 next tokens and its perplexity within 3%; nf4, which re-quantizes weights that
were already 4-bit in the GGUF source, keeps >= 55% and stays within 40%; blocks shrink to at most 26% (int8)
and 14% (nf4) of float32. Deterministic on one machine: the same text and weights give the same numbers.
"""

from __future__ import annotations

import pytest

from bench.quantization import QUALITY_TEXT, real_model_quality, text_windows

pytestmark = pytest.mark.slow


def test_text_windows():
    assert text_windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert text_windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError):
        text_windows([1, 2], 1)


def test_int8_and_nf4_quality_on_smollm2(smollm2_checkpoint):
    text = QUALITY_TEXT.read_text()
    rows = {
        row.quant: row for row in real_model_quality(smollm2_checkpoint, text, window=256, max_tokens=256)
    }
    none, int8, nf4 = rows["none"], rows["int8"], rows["nf4"]
    facts = {
        q: (round(r.perplexity, 3), round(r.top1_agreement, 3), r.bytes_per_block) for q, r in rows.items()
    }
    assert none.tokens == 255 and none.top1_agreement == 1.0, facts
    assert none.perplexity < 60, "a trained model (random weights would score near the vocabulary size)"
    assert int8.top1_agreement >= 0.93 and int8.perplexity <= 1.03 * none.perplexity, facts
    assert nf4.top1_agreement >= 0.55 and nf4.perplexity <= 1.4 * none.perplexity, facts
    assert int8.bytes_per_block <= 0.26 * none.bytes_per_block
    assert nf4.bytes_per_block <= 0.14 * none.bytes_per_block
