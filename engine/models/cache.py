"""Per-session KV cache of a block span: preallocated, so its memory is known up front and never grows.

Each layer keeps keys and values of shape [batch, kv_heads, max_length, head_dim]; `length` says how many
positions are filled. transformers' attention talks to it through `LayerCacheAdapter`, which has the few
methods of transformers' Cache that decoder layers and mask builders call.
"""

from __future__ import annotations

import itertools

import torch

from engine.models.errors import CacheOverflowError


def kv_shape(config) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of one attention layer."""
    from engine.models.registry import family_for

    num_heads = config.num_attention_heads
    family = family_for(config)
    if family.kv_heads is not None:
        num_kv_heads = family.kv_heads(config)
    else:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_kv_heads, head_dim


def cache_bytes(config, num_blocks: int, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache for `num_blocks` blocks holding `batch_size` sequences of `max_length` tokens."""
    num_kv_heads, head_dim = kv_shape(config)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_blocks * batch_size * num_kv_heads * max_length * head_dim * element


class SpanCache:
    """Keys and values of every block in a span for one inference session (a batch of sequences)."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (all of max_length, filled or not)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def num_layers(self) -> int:
        """How many blocks this cache serves."""
        return len(self.keys)

    def check_room(self, num_tokens: int) -> None:
        """Raise CacheOverflowError unless `num_tokens` more positions fit."""
        if self.length + num_tokens > self.max_length:
            raise CacheOverflowError(
                f"KV cache overflow: {self.length} tokens cached + {num_tokens} new > max_length "
                f"{self.max_length}; open the session with a larger max_length"
            )

    @torch.no_grad()
    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Make sequence i continue from sequence hypo_ids[i] (beam search, or dropping finished rows)."""
        hypo_ids = torch.as_tensor(hypo_ids, device=self.keys[0].device if self.keys else "cpu")
        if hypo_ids.dtype not in (torch.int64, torch.int32) or hypo_ids.shape != (self.batch_size,):
            raise ValueError(f"hypo_ids must be {self.batch_size} integers, got {tuple(hypo_ids.shape)}")
        if hypo_ids.numel() and (hypo_ids.min() < 0 or hypo_ids.max() >= self.batch_size):
            raise ValueError(f"hypo_ids must lie in [0, {self.batch_size}), got {hypo_ids.tolist()}")
        if self.length == 0:
            return
        for buffers in (self.keys, self.values):
            for tensor in buffers:
                # Gather into a temporary, then copy back: the buffers keep their storage (and budget).
                tensor[:, :, : self.length] = tensor[hypo_ids, :, : self.length]

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on, so the session continues from an earlier point."""
        if not 0 <= length <= self.length:
            raise ValueError(f"can only truncate to 0..{self.length} positions, got {length}")
        self.length = length

    @torch.no_grad()
    def compact(self, base: int, rows: list[int]) -> None:
        """Keep the tree rows `rows` (offsets from `base`, ascending, a checked path: tree_step.check_path)
        at positions base, base + 1, ... and forget everything after them."""
        if not 0 <= base <= self.length or any(not 0 <= r < self.length - base for r in rows):
            raise ValueError(f"rows {rows} after position {base} are not all among the {self.length} cached")
        if any(b <= a for a, b in itertools.pairwise(rows)):
            raise ValueError(f"rows to keep must ascend, got {rows}")
        # Ascending rows: row j moves down to base + j, never over a row that is still to move.
        for j, row in enumerate(rows):
            if row != j:
                for tensor in (*self.keys, *self.values):
                    tensor[:, :, base + j] = tensor[:, :, base + row]
        self.length = base + len(rows)

    def adapter(self, first_layer_index: int) -> LayerCacheAdapter:
        """The view that transformers' layers write through; block i of the model uses slot i - first."""
        return LayerCacheAdapter(self, first_layer_index)


class LayerCacheAdapter:
    """The part of transformers' Cache interface that decoder layers and masking_utils use.

    Layers call update(k, v, layer_idx) with their global block index; masks ask for query offset and sizes.
    The span advances `cache.length` once after all its layers ran (they all see the same past).
    """

    is_compileable = False  # lets masking_utils skip the mask for plain causal prefill, as for DynamicCache

    def __init__(self, cache: SpanCache, first_layer_index: int):
        self.cache = cache
        self.first_layer_index = first_layer_index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write new keys/values after the cached ones and return all of them for this layer."""
        slot = layer_idx - self.first_layer_index
        start, end = self.cache.length, self.cache.length + key_states.shape[-2]
        keys, values = self.cache.keys[slot], self.cache.values[slot]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (the same for every layer of the span)."""
        return self.cache.length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Absolute position of the first new query token."""
        return self.cache.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset): we keep every position, so keys start at 0 and end after the new tokens."""
        return self.cache.length + query_length, 0
