"""A span of consecutive transformer blocks: what a server hosts and runs for clients."""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from engine.models import few_rows, huge_pages, native_linear
from engine.models.blocks import load_block, prepare_config
from engine.models.cache import SpanCache, kv_shape
from engine.models.checkpoint import CheckpointReader, LoadStats, load_config
from engine.models.lean_step import LEAN_STEP_TOKENS, lean_layers, step_mask, step_threads
from engine.models.quantization import check_quant
from engine.models.registry import ModelFamily, family_for
from engine.models.step_tuner import StepTuner, rule_plan, step_plans
from engine.models.tree_step import check_parents, step_positions, tree_mask

# Decoder layers whose attention takes an explicit boolean mask and per-row positions through transformers
# (tree steps longer than the lean path's, e.g. a replay that rebuilds a cache) as well as on the lean path.
_TREE_LAYER_CLASSES = frozenset(
    {
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "MixtralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
    }
)


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model, run either statelessly (forward/backward) or step by step with a cache.

    Hidden states are cast to the span's dtype on entry. Positions are absolute: `forward` uses 0..T-1,
    `step` continues from the cache's length. Deep prompts (Petals semantics) have shape
    [num_blocks, batch or 1, P, hidden]; before block k the first P positions get prompts[k] added.
    """

    def __init__(
        self, config, family: ModelFamily, start: int, blocks: list[nn.Module], *, dtype, device, quant
    ):
        super().__init__()
        self.config = config
        self.family = family
        self.start = start
        self.end = start + len(blocks)
        self.dtype = dtype
        self.device = torch.device(device)
        self.quant = quant
        self.blocks = nn.ModuleList(blocks)
        self.rotary_emb = (
            family.rotary_embedding(config=config).to(self.device) if family.positions == "rotary" else None
        )
        self.load_stats: LoadStats | None = None
        # Short cached steps of Llama-style blocks on the CPU take a leaner path (lean_step.py).
        self._lean = lean_layers(blocks, self.device) if quant == "none" else None
        if self._lean is not None:
            native_linear.available()  # build the native kernel now, not in the first step (once per machine)
        # Which kernel and threads the lean steps' products use, learnt from the steps' times (step_tuner.py);
        # POLLINATE_STEP_TUNING=0 keeps the fixed rule (few_rows.kernel_for, lean_step.lean_threads).
        self.tune_steps = os.environ.get("POLLINATE_STEP_TUNING", "1") != "0"
        self._tuner: StepTuner | None = None
        self._windows = [
            config.sliding_window if family.attention_kind(config, i) == "sliding_attention" else None
            for i in range(self.start, self.end)
        ]

    @property
    def supports_trees(self) -> bool:
        """Whether `step` takes tree_parents (tree_step.py): rotary layers of known kinds with SDPA."""
        return (
            self.family.positions == "rotary"
            and self.family.attn_implementation in (None, "sdpa")
            and getattr(self.config, "_attn_implementation", "sdpa") == "sdpa"
            and all(type(block).__name__ in _TREE_LAYER_CLASSES for block in self.blocks)
        )

    @property
    def num_blocks(self) -> int:
        """How many blocks this span holds."""
        return self.end - self.start

    def forward(self, hidden_states: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run all blocks over whole sequences at positions 0..T-1, without cache; differentiable."""
        hidden_states = self._check_hidden(hidden_states)
        length = hidden_states.shape[1]
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        return self._run(hidden_states, positions, prompts, cache=None)

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        """An empty KV cache for `batch_size` sequences of up to `max_length` tokens through this span."""
        num_kv_heads, head_dim = kv_shape(self.config)
        return SpanCache(
            num_layers=self.num_blocks,
            batch_size=batch_size,
            max_length=max_length,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.no_grad()
    def step(
        self,
        hidden_states: torch.Tensor,
        cache: SpanCache,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        tree_parents: list[int] | None = None,
    ) -> torch.Tensor:
        """One inference step: reorder the cache by hypo_ids (if given), run T new tokens, append them.

        `tree_parents` makes the step's last len(tree_parents) rows a token tree (tree_step.py): each row at
        its own depth's position, attending to the rows before the tree and its ancestors only."""
        hidden_states = self._check_hidden(hidden_states)
        batch, length = hidden_states.shape[:2]
        if cache.num_layers != self.num_blocks or batch != cache.batch_size:
            raise ValueError(
                f"cache is for {cache.num_layers} blocks x batch {cache.batch_size}, "
                f"got a span of {self.num_blocks} blocks and batch {batch}"
            )
        cache.check_room(length)
        if hypo_ids is not None:
            cache.reorder(hypo_ids)
        masks = None
        if tree_parents is not None:
            if not self.supports_trees:
                raise ValueError(f"{type(self.blocks[0]).__name__} spans do not take tree steps")
            if prompts is not None and prompts.numel():
                raise ValueError("a tree step cannot carry deep prompts")
            parents = check_parents(tree_parents, length)
            positions = torch.tensor([step_positions(cache.length, length, parents)], device=self.device)
            masks = {w: tree_mask(cache.length, length, parents, w, self.device) for w in set(self._windows)}
        else:
            positions = torch.arange(cache.length, cache.length + length, device=self.device).unsqueeze(0)
        if self._lean is not None and length <= LEAN_STEP_TOKENS:
            output = self._run_lean(hidden_states, positions, prompts, cache, masks)
        else:
            output = self._run(hidden_states, positions, prompts, cache=cache, tree_masks=masks)
        cache.length += length
        return output

    def _run(
        self, hidden_states, positions, prompts, *, cache: SpanCache | None, tree_masks: dict | None = None
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        prompts = self._check_prompts(prompts, hidden_states)
        adapter = cache.adapter(self.start) if cache is not None else None
        mask_args = dict(config=self.config, inputs_embeds=hidden_states, attention_mask=None)
        masks = {}
        for kind in {self.family.attention_kind(self.config, i) for i in range(self.start, self.end)}:
            if tree_masks is not None:  # SDPA takes a boolean [batch, 1, queries, keys] mask as it is
                window = self.config.sliding_window if kind == "sliding_attention" else None
                masks[kind] = tree_masks[window][None, None]
                continue
            build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = build(**mask_args, **{_mask_cache_argument(build): adapter})
        position_args = self._position_arguments(hidden_states, positions)
        extra = dict(self.family.extra_layer_kwargs)
        for offset, block in enumerate(self.blocks):
            if prompts is not None:
                hidden_states = _add_prompt(hidden_states, prompts[offset])
            hidden_states = block(
                hidden_states,
                attention_mask=masks[self.family.attention_kind(self.config, self.start + offset)],
                **position_args,
                **extra,
                **{_cache_argument(block): adapter},
            )
            # Older transformers return a tuple (hidden, ...); newer return the tensor itself.
            if isinstance(hidden_states, tuple):
                hidden_states = hidden_states[0]
        return hidden_states

    def _run_lean(self, hidden_states, positions, prompts, cache: SpanCache, masks=None) -> torch.Tensor:
        if not all(layer.current() for layer in self._lean):  # a module was moved or its weights replaced
            self._lean = lean_layers(self.blocks, self.device)
        prompts = self._check_prompts(prompts, hidden_states)
        adapter = cache.adapter(self.start)
        cos, sin = self.rotary_emb(hidden_states, position_ids=positions)
        past, length = cache.length, hidden_states.shape[1]
        if masks is None:
            masks = {window: step_mask(past, length, window, self.device) for window in set(self._windows)}
        rows = hidden_states.shape[0] * length
        tuner = self.step_tuner()
        plan = tuner.choose(rows) if tuner is not None else None
        started = time.perf_counter()
        with (
            step_threads(rows, plan.threads if plan else None),
            few_rows.preferred_kernel(plan.kernel if plan else None),
        ):
            for offset, layer in enumerate(self._lean):
                if prompts is not None:
                    hidden_states = _add_prompt(hidden_states, prompts[offset])
                hidden_states = layer(hidden_states, cos, sin, adapter, masks[self._windows[offset]])
        if tuner is not None:
            tuner.record(rows, plan, time.perf_counter() - started)
        return hidden_states

    def step_tuner(self) -> StepTuner | None:
        """The tuner of this span's lean steps (made at the first step, for the compute threads configured
        then), or None when tuning is off."""
        if not self.tune_steps or self._lean is None:
            return None
        if self._tuner is None:
            threads, onednn = torch.get_num_threads(), few_rows.onednn_available()
            plans = step_plans(threads, onednn, native_linear.available())
            self._tuner = StepTuner(plans, default=functools.partial(rule_plan, threads))
        return self._tuner

    def _position_arguments(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> dict:
        """What blocks need to know where tokens are: rotary position embeddings, or BLOOM's alibi bias."""
        if self.family.positions == "alibi":
            # One linear bias per head over every key position (cached ones included), as BloomModel builds it
            # without padding: [batch * heads, 1, kv_length].
            from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

            heads, batch = self.config.num_attention_heads, hidden_states.shape[0]
            kv_length = int(positions[0, -1]) + 1
            slopes = _get_alibi_slopes(heads, hidden_states.device)
            alibi = slopes[:, None, None] * torch.arange(kv_length, device=hidden_states.device)
            return {"alibi": alibi.repeat(batch, 1, 1).to(hidden_states.dtype)}
        position_embeddings = self.rotary_emb(hidden_states, position_ids=positions)
        return {"position_ids": positions, "position_embeddings": position_embeddings}

    def _check_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden states must be [batch, tokens, {self.config.hidden_size}], "
                f"got {tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[1] == 0:
            raise ValueError("hidden states have no tokens")
        return hidden_states.to(device=self.device, dtype=self.dtype)

    def _check_prompts(
        self, prompts: torch.Tensor | None, hidden_states: torch.Tensor
    ) -> torch.Tensor | None:
        if prompts is None or prompts.numel() == 0:
            return None  # Petals sends an empty "dummy" tensor for "no prompts"
        batch, length, hidden = hidden_states.shape
        if (
            prompts.dim() != 4
            or prompts.shape[0] != self.num_blocks
            or prompts.shape[1] not in (1, batch)
            or prompts.shape[3] != hidden
        ):
            raise ValueError(
                f"prompts must be [{self.num_blocks} blocks, {batch} or 1, prefix, {hidden}], "
                f"got {tuple(prompts.shape)}"
            )
        if prompts.shape[2] > length:
            raise ValueError(f"prompt prefix of {prompts.shape[2]} tokens is longer than the {length} inputs")
        return prompts.to(device=self.device, dtype=self.dtype)


def _add_prompt(hidden_states: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    # Out of place, so autograd can differentiate with respect to both the input and the prompts.
    prefix = prompt.shape[1]
    return torch.cat([hidden_states[:, :prefix] + prompt, hidden_states[:, prefix:]], dim=1)


_CACHE_ARGUMENT_NAMES = (
    "cache",
    "past_key_values",
    "past_key_value",
    "layer_past",
)  # layer_past: BLOOM, Falcon


def _cache_argument(block: nn.Module) -> str:
    """The keyword under which this transformers version's decoder layer takes its KV cache."""
    return _cache_argument_of(type(block))


@functools.cache
def _cache_argument_of(layer_class: type) -> str:
    # transformers renamed past_key_values to cache (5.24); ask the signature instead of the version.
    parameters = inspect.signature(layer_class.forward).parameters
    for name in _CACHE_ARGUMENT_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{layer_class.__name__}.forward takes none of {_CACHE_ARGUMENT_NAMES}")


def load_block_span(
    path: str | Path,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quant: str = "none",
    token: str | None = None,
    on_block: Callable[[int], None] | None = None,
) -> BlockSpan:
    """Load blocks [start, end) of the checkpoint at `path`, reading only those blocks' tensors.

    `quant` is "none", "int8" or "nf4" (bitsandbytes, on CUDA or CPU). `token` is used only when a shard of a
    hub checkpoint still has to be downloaded. `on_block(n)` is called after each block with the count loaded.
    """
    check_quant(quant)
    config = prepare_config(load_config(path))
    family = family_for(config)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(
            f"block span [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks"
        )
    reader = CheckpointReader(path, token=token)
    family = family.for_checkpoint(reader.has)
    blocks = []
    for index in range(start, end):
        block = load_block(reader, family, config, index, dtype=dtype, device=device, quant=quant)
        if torch.device(device).type == "cpu" and quant == "none":
            huge_pages.move_module_weights(block)  # a CPU step streams every weight: fewer TLB misses
        blocks.append(block)
        if on_block is not None:
            on_block(len(blocks))
    span = BlockSpan(config, family, start, blocks, dtype=dtype, device=device, quant=quant)
    span.load_stats = reader.stats
    return span


@functools.cache
def _mask_cache_argument(build) -> str:
    """The cache keyword of transformers' mask builders: `cache` (5.24 deprecates `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(build).parameters else "past_key_values"
