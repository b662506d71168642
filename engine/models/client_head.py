"""The parts of a model a client runs itself: token embeddings, the final norm and the LM head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.models import huge_pages, native_linear
from engine.models.checkpoint import CheckpointReader, LoadStats, load_config
from engine.models.errors import CheckpointError
from engine.models.few_rows import few_rows_linear
from engine.models.registry import family_for

# Up to this many rows (a decode step, a speculative round's k + 1), the LM head runs as weight @ rows.T.
SKINNY_ROWS = 16


class ClientHead(nn.Module):
    """Embeddings in front of the remote blocks and norm + LM head after them."""

    def __init__(
        self, config, embed_tokens: nn.Embedding, norm: nn.Module, lm_head: nn.Linear, embed_norm=None
    ):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.embed_norm = embed_norm  # BLOOM normalizes the embeddings before block 0
        self.norm = norm
        self.lm_head = lm_head
        self.load_stats: LoadStats | None = None

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the head's weights (hidden states are cast to it)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the head's weights."""
        return self.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, H], the input of block 0."""
        hidden = self.embed_tokens(input_ids.to(self.device))
        return hidden if self.embed_norm is None else self.embed_norm(hidden)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Last block's output [B, T, H] -> next-token logits [B, T, vocab] (final norm, then LM head)."""
        hidden_states = self.norm(hidden_states.to(device=self.device, dtype=self.dtype))
        # The LM head is the client's biggest product of a round (SmolLM2: 113 MB read per token): on CPU
        # nn.Linear took 9-10 ms for one row and 18-24 ms for 2-5, weight @ rows.T 3-6 ms.
        head = self.lm_head
        return few_rows_linear(hidden_states, head.weight, head.bias, max_rows=SKINNY_ROWS)


def load_client_parts(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    token: str | None = None,
) -> ClientHead:
    """Load only the embedding, final norm and LM head of the checkpoint (a tied head shares weights)."""
    config = load_config(path)
    family = family_for(config)
    reader = CheckpointReader(path, token=token)
    family = family.for_checkpoint(reader.has)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    keys = [family.embed_key, family.norm_key]
    if family.norm_has_bias:
        keys.append(_bias_key(family.norm_key))
    if family.embed_norm_key is not None:
        keys += [family.embed_norm_key, _bias_key(family.embed_norm_key)]
    if not tied:
        if not reader.has(family.lm_head_key):
            raise CheckpointError(
                f"{path} has no {family.lm_head_key} and its config does not tie it to the embeddings"
            )
        keys.append(family.lm_head_key)
    tensors = {key: tensor.to(dtype) for key, tensor in reader.read(keys).items()}
    if torch.device(device).type == "cpu":
        # The LM head streams its whole matrix every round (SmolLM2: 113 MB): 2 MiB pages save page walks.
        for key in (family.embed_key, family.lm_head_key):
            if key in tensors:
                tensors[key] = huge_pages.copy_to_huge_pages(tensors[key])
        native_linear.available()  # build the few-row kernel now, not in the first round (once per machine)

    embed_weight = tensors[family.embed_key]
    vocab_size, hidden_size = embed_weight.shape
    embed_tokens = nn.Embedding(vocab_size, hidden_size, _weight=embed_weight, _freeze=True)
    norm = _load_norm(family.final_norm(config, hidden_size), tensors, family.norm_key, family.norm_has_bias)
    embed_norm = None
    if family.embed_norm_key is not None:
        embed_norm = family.final_norm(config, hidden_size)
        embed_norm = _load_norm(embed_norm, tensors, family.embed_norm_key, has_bias=True)
    lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
    # Tied: the head is the embedding matrix itself (one tensor in memory, as in the HF model).
    head_weight = (
        embed_tokens.weight if tied else nn.Parameter(tensors[family.lm_head_key], requires_grad=False)
    )
    lm_head.weight = head_weight

    head = ClientHead(config, embed_tokens, norm, lm_head, embed_norm).to(device)
    head.requires_grad_(False)
    head.eval()
    head.load_stats = reader.stats
    return head


def _bias_key(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "bias"


def _load_norm(norm: nn.Module, tensors: dict, weight_key: str, has_bias: bool) -> nn.Module:
    norm.weight = nn.Parameter(tensors[weight_key], requires_grad=False)
    if has_bias:
        norm.bias = nn.Parameter(tensors[_bias_key(weight_key)], requires_grad=False)
    return norm
