"""Feature drafters for tests: they check the features they are given against local transformers.

`CheckingFeatureDrafter` holds the same weights in a local transformers model; at every call it recomputes
the last block's outputs (before the final norm) for tokens[:-1] and compares them with the features the
speculative loop passed, so a row out of place (a rejected draft token's, a missing prefill row) fails the
test. It drafts with the whole local model (an oracle: these tests are about the plumbing, not the
drafting) and corrupts some proposals on purpose, so rounds get rejected and the caches roll back.
"""

from __future__ import annotations

import torch


def last_block_outputs(hf, ids: list[int]) -> torch.Tensor:
    """The last decoder layer's outputs [len(ids), hidden] before the final norm (transformers' own
    `hidden_states[-1]` is after the norm)."""
    captured = []
    handle = hf.model.layers[-1].register_forward_hook(
        lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([ids], dtype=torch.int64))
    finally:
        handle.remove()
    return captured[0].reshape(len(ids), -1)


class CheckingFeatureDrafter:
    """Checks each call's features, then drafts k greedy tokens of `hf` (every `wrong_every`-th draft has a
    wrong token in the middle); with `sampled`, drafts are drawn from a flattened copy of the model's
    distribution and returned with it (a real draft distribution q != p)."""

    wants_features = True

    def __init__(self, hf, wrong_every: int = 2, atol: float = 1e-4, sampled: bool = False, seed: int = 0):
        self.hf, self.wrong_every, self.atol, self.sampled = hf, wrong_every, atol, sampled
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.checked_rows = 0
        self.seen_lengths: list[int] = []

    def draft_with_features(self, tokens, features, k):
        tokens = list(tokens)
        self.calls += 1
        self.seen_lengths.append(len(tokens))
        expected = last_block_outputs(self.hf, tokens[:-1])
        if tuple(features.shape) != tuple(expected.shape):
            raise AssertionError(f"features {tuple(features.shape)}, expected {tuple(expected.shape)}")
        error = float((features.float() - expected).abs().max())
        if error > self.atol:
            raise AssertionError(f"features differ from the local model's by {error} (call {self.calls})")
        self.checked_rows += features.shape[0]
        draft, probs = [], []
        ids = list(tokens)
        with torch.no_grad():
            for _ in range(k):
                logits = self.hf(input_ids=torch.tensor([ids])).logits[0, -1].float()
                if self.sampled:
                    q = (logits / 2.0).softmax(-1)  # flatter than the target: many rejections
                    token = int(torch.multinomial(q, 1, generator=self.generator))
                    probs.append(q)
                else:
                    token = int(logits.argmax())
                draft.append(token)
                ids.append(token)
        if draft and not self.sampled and self.calls % self.wrong_every == 0:
            middle = len(draft) // 2
            draft[middle] = (draft[middle] + 1) % self.hf.config.vocab_size
        return draft, (torch.stack(probs) if probs else None)
