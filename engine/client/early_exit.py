"""A self-speculative drafter: the model's own first blocks, then its final norm and LM head, on the client.

Early exit (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2023): the client already holds
the embeddings, final norm and LM head, so loading the first n blocks of the same checkpoint gives a draft
model that shares the tokenizer and needs no other download. How well it drafts depends on the model:
models trained for early exit accept most drafts; ordinary ones accept few (bench/README.md has the
numbers for SmolLM2), which the adaptive draft length then notices. Loading is bounded by bytes, so a
client of a 70B model never tries to hold its blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from engine.client.speculative import common_prefix
from engine.models.span import BlockSpan

# The most block weights a client loads for drafting by default (a few blocks of a small model).
DEFAULT_MAX_DRAFT_BYTES = 256 * 2**20


def draft_block_count(requested: int, num_blocks: int, block_bytes: int, max_bytes: int) -> int:
    """How many leading blocks to load for an early-exit drafter: `requested`, if it is fewer than the
    model's blocks and fits in `max_bytes`; 0 (no drafter) otherwise."""
    if requested <= 0 or requested >= num_blocks:
        return 0  # all blocks would be the model itself: not a draft
    if requested * block_bytes > max_bytes:
        return 0
    return requested


class EarlyExitDrafter:
    """Drafts greedily with `span` (the model's first blocks) between the client head's embed and logits.

    Keeps a KV cache of what it has read; each call reuses its longest common prefix with the history (the
    verified tokens), so after a rollback only the new tokens are read. One drafter per generation (the
    cache is its state); the blocks themselves may be shared.
    """

    name = "early_exit"

    def __init__(self, head, span: BlockSpan):
        if span.start != 0:
            raise ValueError(
                f"an early-exit drafter needs the first blocks, got a span from block {span.start}"
            )
        self.head = head
        self.span = span
        self.cache = None
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds

    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], None]:
        """Up to k greedy tokens after `history` (a point mass each: no draft distribution)."""
        history = list(history)
        if k <= 0 or not history:
            return [], None
        self._reserve(len(history) + k)
        common = common_prefix(self.cached, history)
        common = min(common, len(history) - 1)  # feed at least one token: its logits start the draft
        self.cache.truncate(common)
        self.cached = history[:common]
        tokens: list[int] = []
        feed = history[common:]
        with torch.no_grad():
            for _ in range(k):
                hidden = self.head.embed(torch.tensor([feed], dtype=torch.int64))
                hidden = self.span.step(hidden, self.cache)
                self.cached.extend(feed)
                token = int(self.head.logits(hidden[:, -1:])[0, -1].argmax())
                tokens.append(token)
                feed = [token]
        return tokens, None

    def _reserve(self, length: int) -> None:
        if self.cache is None or self.cache.max_length < length:
            # Grow by doubling; a new cache starts empty (the history is read again once).
            size = max(256, 2 * length, self.cache.max_length * 2 if self.cache is not None else 0)
            self.cache = self.span.new_cache(1, size)
            self.cached = []


def load_early_exit_blocks(
    path: str | Path,
    num_blocks: int,
    *,
    max_bytes: int = DEFAULT_MAX_DRAFT_BYTES,
    dtype: torch.dtype = torch.float32,
) -> BlockSpan | None:
    """The first `num_blocks` blocks of the checkpoint at `path` for drafting, or None when they would be
    the whole model or exceed `max_bytes`."""
    from engine.models import load_config
    from engine.models.blocks import block_weight_bytes
    from engine.models.span import load_block_span

    config = load_config(path)
    per_block = block_weight_bytes(config, quant="none", dtype=dtype)
    count = draft_block_count(num_blocks, config.num_hidden_layers, per_block, max_bytes)
    if count == 0:
        return None
    return load_block_span(path, 0, count, dtype=dtype)
