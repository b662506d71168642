"""Forward and backward through remote blocks (rpc_forward / rpc_backward), differentiable with autograd.

Used for whole-sequence forward passes and for training (prompt tuning, adapters on the client side).
Routes are chosen for throughput; a failed span is banned and the rest of the pass is re-routed.
"""

from __future__ import annotations

import itertools
import time

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.utils.logging import get_logger
from torch import nn

from engine.client import protocol
from engine.client.routing import Hop
from engine.client.sequence_manager import SequenceManager

logger = get_logger(__name__)


def _with_retries(manager: SequenceManager, what: str, attempt):
    """Run `attempt(attempt_no)` -> (result, hop) until it succeeds, banning the hop's peer on failure."""
    for attempt_no in itertools.count():
        hop = None
        try:
            result, hop = attempt(attempt_no)
            manager.on_request_success(hop.peer_id)
            return result
        except Exception as e:
            peer = getattr(e, "peer_id", None)
            manager.on_request_failure(peer)
            if manager.gives_up(attempt_no):
                raise
            delay = manager.retry_delay(attempt_no)
            logger.warning(f"{what} failed via {peer or 'no server'} ({e!r}); retrying in {delay:.1f} s")
            time.sleep(delay)


class _PeerError(Exception):
    def __init__(self, peer_id: str, cause: Exception):
        super().__init__(f"{peer_id}: {cause!r}")
        self.peer_id = peer_id


def _forward_hop(manager: SequenceManager, hop: Hop, hidden: torch.Tensor) -> torch.Tensor:
    try:
        info = manager.rpc_info(hop.peer_id, hop.start)
        started = time.perf_counter()
        outputs = RemoteExpertWorker.run_coroutine(
            protocol.run_forward(
                manager.p2p,
                hop.peer_id,
                manager.uids(hop.start, hop.end),
                hidden,
                rpc_info=info,
                metadata=manager.request_metadata(),
                timeout=manager.config.request_timeout,
                connect_timeout=manager.config.connect_timeout,
            )
        )
    except Exception as e:
        raise _PeerError(hop.peer_id, e) from e
    manager.report_usage(hop, hidden.shape[0] * hidden.shape[1], time.perf_counter() - started)
    return outputs


def _backward_hop(
    manager: SequenceManager, hop: Hop, inputs: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    try:
        info = manager.rpc_info(hop.peer_id, hop.start)
        started = time.perf_counter()
        grads = RemoteExpertWorker.run_coroutine(
            protocol.run_backward(
                manager.p2p,
                hop.peer_id,
                manager.uids(hop.start, hop.end),
                inputs,
                grad,
                rpc_info=info,
                metadata=manager.request_metadata(),
                timeout=manager.config.request_timeout,
                connect_timeout=manager.config.connect_timeout,
            )
        )
        grad_inputs = grads[0]
    except Exception as e:
        raise _PeerError(hop.peer_id, e) from e
    manager.report_usage(hop, inputs.shape[0] * inputs.shape[1], time.perf_counter() - started)
    return grad_inputs


def sequential_forward(
    manager: SequenceManager, hidden: torch.Tensor, start: int, end: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[Hop]]:
    """Hidden states through blocks [start, end); returns outputs, each hop's inputs, and the hops."""
    inputs_seen: list[torch.Tensor] = []
    hops_done: list[Hop] = []
    block = start
    route: list[Hop] = []
    while block < end:

        def attempt(attempt_no: int, block=block, hidden=hidden):
            nonlocal route
            if not route or attempt_no > 0:
                route = manager.make_sequence(block, end, mode="max_throughput")
            hop = route[0]
            return _forward_hop(manager, hop, hidden), hop

        outputs = _with_retries(manager, f"forward from block {block}", attempt)
        hop = route.pop(0)
        inputs_seen.append(hidden)
        hops_done.append(hop)
        hidden, block = outputs, hop.end
    return hidden, inputs_seen, hops_done


def sequential_backward(
    manager: SequenceManager, grad: torch.Tensor, inputs_seen: list[torch.Tensor], hops: list[Hop]
) -> torch.Tensor:
    """Gradient w.r.t. the first hop's inputs; a failed hop is re-run forward on a new route first."""
    inputs_seen, hops = list(inputs_seen), list(hops)
    while hops:
        inputs, hop = inputs_seen.pop(), hops.pop()

        def attempt(attempt_no: int, inputs=inputs, hop=hop, grad=grad):
            nonlocal inputs_seen, hops
            if attempt_no > 0:
                # Recompute this span's intermediate inputs on other servers, then back-propagate the last.
                _, more_inputs, more_hops = sequential_forward(manager, inputs, hop.start, hop.end)
                inputs_seen, hops = inputs_seen + more_inputs[:-1], hops + more_hops[:-1]
                inputs, hop = more_inputs[-1], more_hops[-1]
            return _backward_hop(manager, hop, inputs, grad), hop

        grad = _with_retries(manager, f"backward of blocks {hop.start}:{hop.end}", attempt)
    return grad


class _RemoteSequentialFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, manager: SequenceManager, start: int, end: int) -> torch.Tensor:
        device, dtype = hidden.device, hidden.dtype
        outputs, inputs_seen, hops = sequential_forward(manager, hidden.detach().cpu(), start, end)
        ctx.manager, ctx.inputs_seen, ctx.hops = manager, inputs_seen, hops
        ctx.device, ctx.dtype = device, dtype
        return outputs.to(device=device, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor):
        grad = sequential_backward(ctx.manager, grad_outputs.detach().cpu(), ctx.inputs_seen, ctx.hops)
        return grad.to(device=ctx.device, dtype=ctx.dtype), None, None, None


class RemoteSequential(nn.Module):
    """Blocks [start, end) of a model served by the swarm, as one differentiable module."""

    def __init__(self, manager: SequenceManager, start: int = 0, end: int | None = None):
        super().__init__()
        self.manager = manager
        self.start, self.end = start, manager.num_blocks if end is None else end

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.ndim != 3:
            raise ValueError(
                f"hidden states must be [batch, tokens, hidden], got shape {tuple(hidden.shape)}"
            )
        return _RemoteSequentialFunction.apply(hidden, self.manager, self.start, self.end)

    def __len__(self) -> int:
        return self.end - self.start

    def extra_repr(self) -> str:
        return f"blocks={self.start}:{self.end}, prefix={self.manager.dht_prefix}"
