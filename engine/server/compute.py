"""What the server computes for each request, on the compute loop: forward, backward and inference steps.

These functions take decoded, validated tensors (see protocol.py) and return tensors; they know nothing of the
wire. They run on the TaskPool's worker thread, one at a time. A request may name any consecutive part of the
hosted span (Petals clients cut spans at other servers' boundaries), so `HostedSpan` serves sub-spans that
share the loaded blocks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from engine.models.cache import SpanCache, cache_bytes
from engine.models.span import BlockSpan


class HostedSpan:
    """The blocks this server loaded, and views of any consecutive part of them."""

    def __init__(self, span: BlockSpan):
        self.span = span
        self.start, self.end = span.start, span.end
        self.config = span.config
        self.dtype = span.dtype
        self.hidden_size = span.config.hidden_size
        self._views: dict[tuple[int, int], BlockSpan] = {(span.start, span.end): span}
        self._lock = threading.Lock()

    def view(self, start: int, end: int) -> BlockSpan:
        """Blocks [start, end) as a BlockSpan sharing this span's modules (built once per range)."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"[{start}, {end}) is not inside the hosted span [{self.start}, {self.end})")
        with self._lock:
            view = self._views.get((start, end))
            if view is None:
                span = self.span
                blocks = list(span.blocks[start - span.start : end - span.start])
                view = BlockSpan(
                    span.config,
                    span.family,
                    start,
                    blocks,
                    dtype=span.dtype,
                    device=span.device,
                    quant=span.quant,
                )
                self._views[(start, end)] = view
            return view

    def cache_bytes(self, num_blocks: int, batch_size: int, max_length: int) -> int:
        """Bytes of KV cache a session over `num_blocks` of these blocks needs."""
        return cache_bytes(self.config, num_blocks, batch_size, max_length, self.dtype)

    def cache_bytes_per_token(self) -> int:
        """Keys + values of one token in one block (Petals' unit for rpc_info's cache_tokens_available)."""
        return self.cache_bytes(1, 1, 1)

    def release(self) -> None:
        """Drop the views and the loaded blocks, so their memory can be freed."""
        with self._lock:
            self._views.clear()
        self.span = None  # type: ignore[assignment]


def run_forward(view: BlockSpan, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """Hidden states after the blocks of `view` (no cache, no gradient)."""
    with torch.inference_mode():
        return view.forward(hidden, prompts).detach().cpu()


def run_backward(
    view: BlockSpan, inputs: torch.Tensor, grad_outputs: torch.Tensor, prompts: torch.Tensor | None
) -> list[torch.Tensor]:
    """Gradients with respect to the span's inputs (and its deep prompts, when given), by autograd.

    Petals returns [grad_inputs] or [grad_inputs, grad_prompts]; grad_prompts has the full batch dimension
    even when the prompts were shared across the batch (shape [blocks, 1, ...]), so we expand them first.
    """
    with torch.enable_grad():
        inputs = inputs.detach().to(device=view.device, dtype=view.dtype).requires_grad_(True)
        leaves = [inputs]
        if prompts is not None:
            batch = inputs.shape[0]
            prompts = prompts.detach().to(device=view.device, dtype=view.dtype)
            prompts = prompts.expand(-1, batch, -1, -1).contiguous().requires_grad_(True)
            leaves.append(prompts)
        outputs = view.forward(inputs, prompts)
        grads = torch.autograd.grad(outputs, leaves, grad_outputs.to(device=view.device, dtype=outputs.dtype))
    return [grad.detach().cpu() for grad in grads]


@dataclass
class SessionState:
    """The server side of one inference session: its blocks, its KV cache (made on first use)."""

    view: BlockSpan
    batch_size: int
    max_length: int
    cache: SpanCache | None = None
    processed_step_ids: set[str] = field(default_factory=set)
    # The previous step's token tree: its parents and the cache position of its first row (None: no tree).
    tree_parents: list[int] | None = None
    tree_base: int = 0

    @property
    def position(self) -> int:
        """Tokens already in the cache."""
        return self.cache.length if self.cache is not None else 0


def run_inference_step(
    session: SessionState,
    hidden: torch.Tensor,
    prompts: torch.Tensor | None,
    hypo_ids: torch.Tensor | None,
    start_from_position: int | None,
    tree_parents: list[int] | None = None,
    tree_accepted: list[int] | None = None,
) -> torch.Tensor:
    """Append `hidden` to the session's cache and return the span's outputs for these tokens.

    `tree_accepted` (checked against session.tree_parents) first keeps that path of the previous step's tree
    and drops its other rows; `start_from_position` then cuts the cache back; `tree_parents` makes this
    step's last rows a tree (engine/models/tree_step.py)."""
    if session.cache is None:
        session.cache = session.view.new_cache(session.batch_size, max(session.max_length, 1))
    if tree_accepted is not None:
        session.cache.compact(session.tree_base, tree_accepted)
    session.tree_parents = None
    if start_from_position is not None:
        session.cache.truncate(start_from_position)
    if hidden.shape[1] == 0:
        # Petals allows 0-token steps (e.g. to check that the cache can be allocated): echo them back.
        if hypo_ids is not None:
            session.cache.reorder(hypo_ids)
        return hidden
    base = session.cache.length + hidden.shape[1] - len(tree_parents or ())
    with torch.inference_mode():  # lighter than no_grad: no version counters or autograd metadata
        outputs = session.view.step(hidden, session.cache, prompts, hypo_ids, tree_parents).detach().cpu()
    if tree_parents is not None:
        session.tree_parents, session.tree_base = tree_parents, base
    return outputs
