"""How much work one request may ask of a server, and how a long forward is cut into chunks.

Pure decisions, no I/O. The limits are announced in rpc_info and checked before any compute (first on the
sizes a request declares, before its tensors are decoded), so no single peer can hold the compute loop for
long: a forward bigger than one chunk runs as several tasks, and inference steps of other peers go between
them; a request whose caller left or whose deadline passed stops at the next chunk boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.server.protocol import RequestError

MiB = 1024**2


@dataclass(frozen=True)
class WorkLimits:
    """Per-request bounds of a server (ServerConfig fields of the same names)."""

    # Tokens (batch x length) one rpc_forward / rpc_backward may carry.
    max_request_tokens: int = 8192
    # Bytes of tensors one request may send (the decoded size is about the same).
    max_request_bytes: int = 256 * MiB
    # Tokens the compute loop runs in one go for a forward; longer forwards interleave with other work.
    forward_chunk_tokens: int = 512

    def announced(self) -> dict[str, int]:
        """The keys rpc_info adds for clients (Petals clients ignore unknown keys)."""
        return {
            "max_request_tokens": self.max_request_tokens,
            "max_request_bytes": self.max_request_bytes,
            "forward_chunk_tokens": self.forward_chunk_tokens,
        }


def check_declared(method: str, shapes: Iterable[Sequence[int]], nbytes: int, limits: WorkLimits) -> None:
    """Refuse a request from the shapes and byte count it declares, before decoding or computing anything.

    Tokens are counted on the [batch, tokens, hidden] tensors (hidden states, gradients).
    """
    if nbytes > limits.max_request_bytes:
        raise RequestError(
            f"{method}: the request sends {nbytes} bytes, over this server's limit of "
            f"{limits.max_request_bytes} bytes per request (max_request_bytes in rpc_info)"
        )
    for shape in shapes:
        if len(shape) == 3:
            check_tokens(method, int(shape[0]) * int(shape[1]), limits)


def check_tokens(method: str, tokens: int, limits: WorkLimits) -> None:
    """Refuse a forward/backward of more than max_request_tokens tokens; the message names the limit."""
    if tokens > limits.max_request_tokens:
        raise RequestError(
            f"{method}: {tokens} tokens (batch x length) is over this server's limit of "
            f"{limits.max_request_tokens} tokens per request (max_request_tokens in rpc_info); "
            "split the work into smaller requests"
        )


@dataclass(frozen=True)
class Chunk:
    """One compute-loop task of a forward: rows [row_start, row_end) x tokens [token_start, token_end)."""

    row_start: int
    row_end: int
    token_start: int
    token_end: int

    @property
    def first_of_rows(self) -> bool:
        """Whether this chunk starts its rows' sequences (a fresh KV cache is needed)."""
        return self.token_start == 0


def plan_forward_chunks(batch: int, length: int, chunk_tokens: int) -> list[Chunk]:
    """Cut a [batch, length] forward into tasks of at most about `chunk_tokens` tokens each.

    Whole sequences are grouped when they fit a chunk; a longer sequence is cut along its tokens (the chunks
    of one group run in order and share a KV cache, so the result is the forward of the whole sequence).
    A chunk's attention reads every token before it, so later chunks are shorter: each costs about what the
    first one does (size x (start + size) ~ chunk_tokens^2), down to chunk_tokens / 4 tokens (each task has
    its own overhead too).
    """
    if batch < 1 or length < 1:
        return [Chunk(0, batch, 0, length)]
    chunk_tokens = max(1, chunk_tokens)
    if length <= chunk_tokens:
        rows = max(1, chunk_tokens // length)
        return [Chunk(r, min(r + rows, batch), 0, length) for r in range(0, batch, rows)]
    smallest = max(1, chunk_tokens // 4)
    chunks = []
    for row in range(batch):
        start = 0
        while start < length:
            size = max(smallest, chunk_tokens * chunk_tokens // (chunk_tokens + start))
            chunks.append(Chunk(row, row + 1, start, min(start + size, length)))
            start += size
    return chunks


def plan_backward_rows(batch: int, length: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Row groups of a backward (rows are independent; a sequence is never cut: autograd needs it whole)."""
    rows = max(1, chunk_tokens // max(length, 1))
    return [(r, min(r + rows, batch)) for r in range(0, max(batch, 1), rows)]
