"""A lean path for short cached steps (decode, speculation) through Llama-style blocks on the CPU.

A one-token step of a few blocks on a CPU is bound by reading the weights (matrix-vector products) and then by
per-op overhead: seven projections per layer, the attention dispatch, Python around them. This path computes
the same layer with fewer ops: q/k/v and gate/up each as one matrix product (their weights are joined once
at load time, and the Linear modules keep views of the joint tensor, so memory does not grow and every other
path sees the same numbers), and SDPA straight on the cache's keys and values (grouped heads shared, no mask
for one query). The norms are one fused op each (functional.rms_norm: the RMSNorm modules' arithmetic), q
and k are rotated together while still side by side in the q/k/v product (the Llama-style formula of
transformers' apply_rotary_pos_emb), the activation is the layer's own module. With the same product
kernel the outputs equal transformers' bit for bit in fp32 on SmolLM2; the kernels chosen for few rows
(few_rows.py) sum in another order, ~1e-6 apart (the tests compare every family within 1e-5).

Only layers whose structure is known take it: Llama, Mistral, Qwen2 and Qwen3 decoder layers with plain
(unquantized) Linear projections on the CPU. Everything else (and prefills longer than LEAN_STEP_TOKENS) runs
through transformers as before; a GPU keeps transformers' kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from engine.models import huge_pages
from engine.models.few_rows import ONEDNN_ROWS, few_rows_linear

# Steps of at most this many new tokens take the lean path; longer ones (prefills) keep SDPA's kernels, which
# pay off once there are many queries.
LEAN_STEP_TOKENS = 16

_LAYER_CLASSES = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
# Their norms: weight * (x * rsqrt(mean(x^2) + variance_epsilon)) in float32, i.e. functional.rms_norm.
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


@dataclass(frozen=True)
class LeanLayer:
    """One decoder layer's modules and joint weights, as the lean step uses them."""

    layer: nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up_weight: torch.Tensor
    head_dim: int
    scaling: float

    addresses: tuple[int, ...] = ()  # where the joined parts' data started when they were joined

    def current(self) -> bool:
        """Whether the layer's projections still view the joint weights (moving a module replaces them).
        Checked before every step, so it only compares the parts' addresses with those they were given."""
        return tuple(part.data_ptr() for part in _joined_parts(self.layer)) == self.addresses

    def __call__(self, hidden, cos, sin, adapter, mask: torch.Tensor | None) -> torch.Tensor:
        # Few ops, few temporaries: a step of a few rows is bound by the weights' reads, then by per-op
        # overhead (~40 ops a layer). q and k are rotated in one go while still side by side in qkv.
        layer = self.layer
        attn, mlp = layer.self_attn, layer.mlp
        batch, length = hidden.shape[:2]
        qkv = few_rows_linear(_norm(layer.input_layernorm, hidden), self.qkv_weight, self.qkv_bias)
        heads = qkv.view(batch, length, -1, self.head_dim)  # [batch, T, q + k + v heads, dim]
        q_heads, k_heads = self.qkv_sizes[0] // self.head_dim, self.qkv_sizes[1] // self.head_dim
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head before the rotation
            query = _rotate(attn.q_norm(heads[:, :, :q_heads]), cos, sin)
            key = _rotate(attn.k_norm(heads[:, :, q_heads : q_heads + k_heads]), cos, sin)
        else:
            rotated = _rotate(heads[:, :, : q_heads + k_heads], cos, sin)
            query, key = rotated[:, :, :q_heads], rotated[:, :, q_heads:]
        value = heads[:, :, q_heads + k_heads :]
        keys, values = adapter.update(key.transpose(1, 2), value.transpose(1, 2), attn.layer_idx)
        attended = _attention(query.transpose(1, 2), keys, values, self.scaling, mask)
        attended = attended.transpose(1, 2).reshape(batch, length, -1)
        hidden = few_rows_linear(attended, attn.o_proj.weight, attn.o_proj.bias).add_(hidden)
        normed = _norm(layer.post_attention_layernorm, hidden)
        gate, up = few_rows_linear(normed, self.gate_up_weight).chunk(2, -1)
        activated = mlp.act_fn(gate).mul_(up)
        return few_rows_linear(activated, mlp.down_proj.weight, mlp.down_proj.bias).add_(hidden)


def _norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's RMSNorm as one fused op (the module's seven ops give the same numbers in fp32)."""
    if hidden.dtype == norm.weight.dtype == torch.float32 and type(norm).__name__ in _RMS_NORMS:
        return functional.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [batch, T, heads, dim] (cos/sin [batch, T, 1, dim]), as transformers' Llama-style
    apply_rotary_pos_emb computes it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention(query, keys, values, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of [batch, heads, T, dim] queries over [batch, kv_heads, L, dim] cached keys and values, the
    key/value heads shared by their query groups without copies; `mask` [T, L] (True = may attend) or None."""
    grouped = query.shape[1] != keys.shape[1]
    return functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=grouped
    )


def lean_threads(rows: int, threads: int) -> int:
    """Compute threads for a lean step of `rows` rows (batch x tokens) when `threads` are configured and no
    step tuner chooses (step_tuner.py; POLLINATE_STEP_TUNING=0): the fixed rule of before the tuner.

    Below ONEDNN_ROWS every product is MKL's few-row gemm; under load (this rule was measured with other
    processes on both cores) a second thread mostly waited: a SmolLM2 step through 30 blocks took 33.7 ms on
    1 thread against 38.6 on 2 (`bench/round_cost.py --threads 2 1`). With oneDNN's products (6+ rows) more
    threads may pay on a CPU with many idle cores; with 2 one was faster again (8 rows 64.5 vs 68.2 ms). On
    a quiet machine 2 threads can be faster (step_tuner.py's table), which is why the tuner measures."""
    if rows < ONEDNN_ROWS or threads <= 2:
        return 1
    return threads


@contextlib.contextmanager
def step_threads(rows: int, wanted: int | None = None) -> Iterator[None]:
    """Run a lean step of `rows` rows on `wanted` compute threads (default: `lean_threads`), then restore the
    setting (the server computes one step at a time, so the process-wide setting is this step's)."""
    threads = torch.get_num_threads()
    if wanted is None:
        wanted = lean_threads(rows, threads)
    if wanted == threads:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_mask(past: int, length: int, window: int | None, device) -> torch.Tensor | None:
    """Which keys each of `length` new queries (after `past` cached tokens) may attend to: [length, past +
    length], True = may; None when all may (one query inside its window). `window`: sliding-window size."""
    last = past + length
    if length == 1 and (window is None or last <= window):
        return None
    queries = torch.arange(past, last, device=device)[:, None]
    keys = torch.arange(last, device=device)[None, :]
    allowed = keys <= queries
    if window is not None:
        allowed &= queries - keys < window
    return allowed


def lean_layers(blocks, device) -> list[LeanLayer] | None:
    """Lean layers for `blocks` (joining their q/k/v and gate/up weights in place, once), or None when a
    block cannot take the lean path (unknown layer class, quantized or biased MLP projections, not on CPU)."""
    if torch.device(device).type != "cpu":
        return None
    if not all(_supported(block) for block in blocks):
        return None
    return [_lean_layer(block) for block in blocks]


def _supported(block: nn.Module) -> bool:
    if type(block).__name__ not in _LAYER_CLASSES:
        return False
    attn, mlp = block.self_attn, block.mlp
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    projections += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(p) is not nn.Linear for p in projections):  # bitsandbytes layers are subclasses
        return False
    if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
        return False
    biases = {attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}
    return len(biases) == 1  # all or none: they are joined too


def _lean_layer(block: nn.Module) -> LeanLayer:
    # Spans that share blocks (a server's views of its span) share the joint weights too.
    lean = getattr(block, _ATTRIBUTE, None)
    if lean is not None and lean.current():
        return lean
    attn, mlp = block.self_attn, block.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv_weight = _join(qkv, "weight")
    qkv_bias = _join(qkv, "bias") if attn.q_proj.bias is not None else None
    gate_up_weight = _join((mlp.gate_proj, mlp.up_proj), "weight")
    sizes = tuple(p.out_features for p in qkv)
    addresses = tuple(part.data_ptr() for part in _joined_parts(block))
    lean = LeanLayer(
        block, qkv_weight, qkv_bias, sizes, gate_up_weight, attn.head_dim, attn.scaling, addresses
    )
    object.__setattr__(block, _ATTRIBUTE, lean)  # a plain attribute: not a submodule, not in the state dict
    return lean


_ATTRIBUTE = "_pollinate_lean_layer"


def _joined_parts(block: nn.Module) -> list[torch.Tensor]:
    """The tensors that _lean_layer joins: q/k/v weights (and biases, if any), gate/up weights."""
    attn, mlp = block.self_attn, block.mlp
    parts = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight]
    parts.append(mlp.up_proj.weight)
    if attn.q_proj.bias is not None:
        parts += [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
    return parts


def _join(linears, name: str) -> torch.Tensor:
    """One tensor holding the linears' `name` tensors one after the other along dim 0; each linear then
    holds a view of its part, so the memory is the same and every path computes with the same numbers."""
    parts = [getattr(linear, name) for linear in linears]
    shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
    joined = torch.cat([part.detach() for part in parts], out=huge_pages.empty(shape, parts[0].dtype))
    offset = 0
    for linear, part in zip(linears, parts, strict=True):
        view = joined[offset : offset + len(part)]
        setattr(linear, name, nn.Parameter(view, requires_grad=part.requires_grad))
        offset += len(part)
    return joined
