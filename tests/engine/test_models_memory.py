"""A span's memory grows by about the size of its own blocks, not the whole model's (selective loading)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter. A first one-block span warms up what any span needs once (transformers'
# modelling modules, torch kernels: ~170 MB, independent of the model's size); then RSS is read before and
# after loading a two-block span and running it (weights that are zero-copy views of the files count once
# touched).
_MEASURE = """
import json, sys, psutil, torch
from engine.models import load_block_span
process = psutil.Process()
warm = load_block_span(sys.argv[1], 0, 1)
with torch.no_grad():
    warm.forward(torch.randn(1, 4, warm.config.hidden_size))
before = process.memory_info().rss
span = load_block_span(sys.argv[1], 3, 5)
with torch.no_grad():
    span.forward(torch.randn(1, 4, span.config.hidden_size))
after = process.memory_info().rss
weights = sum(p.numel() * p.element_size() for p in span.parameters())
print(json.dumps({"growth": after - before, "span_weights": weights}))
import gc; gc.freeze()  # exit without the interpreter's last collections over every torch object (seconds)
"""


def test_span_memory_grows_by_its_blocks_only(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=8, hidden_size=512, max_shard_size="8MB")
    checkpoint_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    span_weights, growth = measured["span_weights"], measured["growth"]
    # 2 of 8 blocks: about a quarter of the block weights (the embeddings and head are not loaded at all).
    assert span_weights < checkpoint_bytes / 3
    # Growth = the span's weights plus small runtime overhead; far from the whole checkpoint.
    assert growth < 1.5 * span_weights + 8 * 2**20, (growth, span_weights)
    assert growth < checkpoint_bytes / 2, (growth, checkpoint_bytes)
