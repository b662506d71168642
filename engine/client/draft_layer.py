"""The feature drafter's layer prepared for drafting on the client CPU: a few rows per call, in a few ms.

Drafting runs the draft layer (engine.client.feature_drafter.FeatureDrafterModel) over 1-16 rows at a time
and then an LM head over the draft vocabulary. Written as nn.Module calls, one draft token cost 10-35 ms on
this 2-core machine under load: two threads (the other core busy with servers) wait on each other for
products of a few microseconds, RoPE tables were rebuilt per call, the KV cache was concatenated per call,
and GQA heads were repeated. Here, once per loaded drafter: q/k/v and gate/up joined into one matrix each,
weights in bfloat16 on CPU (the products read half the bytes; the head over ~9k rows 1.6 -> 0.4 ms for one
row), a RoPE table; per generation a preallocated KV cache; each call runs on one thread. The same math as
the module's forward up to rounding (bfloat16 products); drafts are only proposals, the model verifies them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Drafting's products are tiny: a second thread costs more to wake than it saves, and on a busy machine
# two threads wait for each other (a draft token took 10-35 ms at 2 threads under load, ~2 ms at 1).
DRAFT_THREADS = 1


@contextlib.contextmanager
def draft_threads(threads: int = DRAFT_THREADS):
    """Run the body with `threads` torch threads, then restore the caller's count (costs < 1 us)."""
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_dtype_for(head) -> torch.dtype:
    """bfloat16 products on CPU for a float32 head (half the bytes; CPUs with AVX-512 BF16 run them at
    full speed, others still read half); the head's own dtype elsewhere."""
    if head.device.type == "cpu" and head.dtype == torch.float32:
        return torch.bfloat16
    return head.dtype


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class PreparedDraftLayer:
    """The draft layer's weights laid out for a few rows at a time, and the LM head over the draft vocabulary.

    Inputs and outputs are float32 [T, d]; products run in `dtype` as weight @ rows.T."""

    def __init__(self, model, head, draft_vocab: torch.Tensor | None, dtype: torch.dtype | None = None):
        c = model.config
        self.config = c
        self.dtype = dtype or compute_dtype_for(head)
        self.device = head.device
        self.head_norm = head.norm
        d, hd = c.hidden_size, c.head_dim
        self.q_size, self.kv_size = c.num_attention_heads * hd, c.num_key_value_heads * hd

        def prepared(*tensors):
            joined = torch.cat([t.detach().to(device=self.device, dtype=torch.float32) for t in tensors])
            return joined.to(self.dtype).contiguous()

        def vector(t):
            return t.detach().to(device=self.device, dtype=torch.float32).contiguous()

        self.fc_feature = prepared(model.fc.weight[:, :d])  # fc over [feature, embedding] as two products
        self.fc_embed = prepared(model.fc.weight[:, d:])
        self.fc_bias = vector(model.fc.bias)
        self.input_norm, self.post_norm = vector(model.input_norm.weight), vector(model.post_norm.weight)
        self.qkv = prepared(model.q_proj.weight, model.k_proj.weight, model.v_proj.weight)
        self.o = prepared(model.o_proj.weight)
        self.gate_up = prepared(model.gate_proj.weight, model.up_proj.weight)
        self.down = prepared(model.down_proj.weight)
        self.eps = c.rms_norm_eps
        self.vocab = None if draft_vocab is None else draft_vocab.to(self.device)
        rows = head.lm_head.weight if self.vocab is None else head.lm_head.weight[self.vocab]
        self.head_rows = prepared(rows)
        bias = getattr(head.lm_head, "bias", None)
        self.head_bias = None if bias is None else vector(bias if self.vocab is None else bias[self.vocab])
        self.embed_tokens = head.embed_tokens.weight
        self.embed_norm = getattr(head, "embed_norm", None)
        self._rope_cos = self._rope_sin = torch.empty(0, hd)

    # --- pieces ---

    def _mm(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """rows [T, in] (float32) @ weight.T -> [T, out] float32, as weight @ rows.T (fast for few rows)."""
        x = rows.to(self.dtype)
        if x.shape[0] == 1 and self.dtype == torch.float32:  # a gemv is slower than a 2-row gemm here
            return (weight @ torch.cat([x, x]).t())[:, :1].t().float()
        return (weight @ x.t()).t().float()

    def embed(self, tokens: list[int]) -> torch.Tensor:
        """Token ids -> their embeddings [T, d] float32 (as the client head embeds them)."""
        ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        out = self.embed_tokens[ids]
        if self.embed_norm is not None:
            out = self.embed_norm(out)
        return out.float()

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] at `positions` (a table grown by doubling, so no trigonometry per call)."""
        need = int(positions.max()) + 1
        if need > self._rope_cos.shape[0]:
            size = max(need, 2 * self._rope_cos.shape[0], 256)
            half = self.config.head_dim // 2
            inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, half, dtype=torch.float32) / half))
            angles = torch.arange(size, dtype=torch.float32)[:, None] * inv[None, :]
            self._rope_cos = torch.cat([angles.cos(), angles.cos()], -1).to(self.device)
            self._rope_sin = torch.cat([angles.sin(), angles.sin()], -1).to(self.device)
        return self._rope_cos[positions], self._rope_sin[positions]

    def step(
        self,
        features: torch.Tensor,
        embeddings: torch.Tensor,
        positions: torch.Tensor,
        cache: DraftCache,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features, embeddings [T, d] at `positions` [T] -> the guessed next features [T, d].

        The T rows' keys/values are appended to `cache`; `mask` [T, len(cache) after appending] says which
        cached positions each row sees (None: all of them, right for a single row)."""
        c = self.config
        t = features.shape[0]
        x = self._mm(self.fc_feature, features) + self._mm(self.fc_embed, embeddings) + self.fc_bias
        qkv = self._mm(self.qkv, _rms(x, self.input_norm, self.eps))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        cos, sin = self.rope_tables(positions)
        q = _rotate(q.view(t, c.num_attention_heads, c.head_dim).transpose(0, 1), cos, sin)
        k = _rotate(k.view(t, c.num_key_value_heads, c.head_dim).transpose(0, 1), cos, sin)
        keys, values = cache.append(k, v.view(t, c.num_key_value_heads, c.head_dim).transpose(0, 1))
        attn = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
        )[0]
        x = x + self._mm(self.o, attn.transpose(0, 1).reshape(t, self.q_size))
        gate, up = self._mm(self.gate_up, _rms(x, self.post_norm, self.eps)).chunk(2, -1)
        return x + self._mm(self.down, F.silu(gate) * up)

    def logits(self, guesses: torch.Tensor) -> torch.Tensor:
        """Guessed features [T, d] -> logits over the draft vocabulary [T, V'] (final norm, then the head)."""
        hidden = self.head_norm(guesses.to(self.embed_tokens.dtype)).float()
        out = self._mm(self.head_rows, hidden)
        return out if self.head_bias is None else out + self.head_bias

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices into the draft vocabulary -> token ids."""
        return indices if self.vocab is None else self.vocab[indices]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE of x [heads, T, head_dim] with the tables' rows for its T positions."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class DraftCache:
    """The draft layer's keys and values [kv_heads, length, head_dim] in buffers grown by doubling; `crop`
    only shortens the length (no copy), `append` writes in place."""

    def __init__(self, kv_heads: int, head_dim: int, device=None, capacity: int = 256):
        self.keys = torch.zeros(kv_heads, capacity, head_dim, device=device)
        self.values = torch.zeros(kv_heads, capacity, head_dim, device=device)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        self.length = min(self.length, max(length, 0))

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [kv_heads, T, head_dim] after the kept positions; returns views of all of them."""
        end = self.length + keys.shape[1]
        if end > self.keys.shape[1]:
            size = max(end, 2 * self.keys.shape[1])
            for name in ("keys", "values"):
                old = getattr(self, name)
                grown = old.new_zeros(old.shape[0], size, old.shape[2])
                grown[:, : self.length] = old[:, : self.length]
                setattr(self, name, grown)
        self.keys[:, self.length : end] = keys
        self.values[:, self.length : end] = values
        self.length = end
        return self.keys[:, :end], self.values[:, :end]
