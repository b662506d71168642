"""The last block's outputs at the verified positions of a generation, for drafters that draft from them.

A feature drafter (EAGLE-style, engine.client.feature_drafter) predicts the next tokens from the full model's
last-block features, which the client gets for free: every inference step returns the last block's outputs
for the tokens it sent (the LM head runs here). Speculative rounds append the rows of the tokens the model
verified and leave out rejected draft tokens, so row i is always position i of the conversation.
"""

from __future__ import annotations

from typing import Any

import torch


class FeatureHistory:
    """Rows [length, hidden] in a buffer that grows by doubling: a round appends a few rows and a rollback
    only shortens `length`, so no round copies the whole history."""

    def __init__(self, capacity: int = 256):
        self._capacity = max(capacity, 1)
        self._buffer: torch.Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, rows: torch.Tensor) -> None:
        """Add rows [n, hidden] after the current ones."""
        if rows.ndim != 2:
            raise ValueError(f"feature rows must be [tokens, hidden], got shape {tuple(rows.shape)}")
        needed = self.length + rows.shape[0]
        buffer = self._buffer
        if buffer is None or buffer.shape[1] != rows.shape[1] or buffer.dtype != rows.dtype:
            if self.length:
                raise ValueError(
                    f"feature rows of shape {tuple(rows.shape)} and {rows.dtype} do not extend "
                    f"rows of width {buffer.shape[1]} and {buffer.dtype}"
                )
            buffer = self._buffer = rows.new_empty(max(self._capacity, needed), rows.shape[1])
        elif buffer.shape[0] < needed:
            grown = buffer.new_empty(max(2 * buffer.shape[0], needed), buffer.shape[1])
            grown[: self.length] = buffer[: self.length]
            buffer = self._buffer = grown
        buffer[self.length : needed] = rows
        self.length = needed

    def truncate(self, length: int) -> None:
        """Keep the first `length` rows (a rollback past them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} of {self.length} feature rows")
        self.length = length

    def view(self) -> torch.Tensor:
        """The rows so far [length, hidden], a view of the buffer (valid until the next append)."""
        if self._buffer is None:
            return torch.empty(0, 0)
        return self._buffer[: self.length]


def wants_features(drafter: Any) -> bool:
    """Whether `drafter` drafts from the last block's features (`draft_with_features`)."""
    return bool(getattr(drafter, "wants_features", False)) and hasattr(drafter, "draft_with_features")


def session_features(session: Any, verified: int) -> FeatureHistory | None:
    """The session's feature rows for its first `verified` positions, kept on the session across the
    turns of a conversation; a new history when the session holds nothing yet, None when earlier turns ran
    without keeping features (a feature drafter cannot draft in this generation then)."""
    history = getattr(session, "features", None)
    if verified == 0:
        history = FeatureHistory(capacity=min(getattr(session, "max_length", 256), 4096))
    elif history is None or len(history) < verified:
        return None
    else:
        history.truncate(verified)
    session.features = history
    return history
