"""Bounded work per request: limits in rpc_info, refused before compute, long forwards chunked, deadlines."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.asyncio import iter_as_aiter

from engine.models.span import load_block_span
from engine.server.task_pool import TaskKind
from engine.server.work_limits import Chunk, WorkLimits, plan_backward_rows, plan_forward_chunks
from tests.helpers.servers import DUMMY, WireClient, pack_args, running_server, wait_for

HIDDEN = 64
UIDS = "tiny.0 tiny.1 tiny.2 tiny.3"
LIMITS = dict(max_request_tokens=4096, max_request_bytes=600_000, forward_chunk_tokens=32)


# --- pure planning ---


def test_forward_chunks_cover_the_request_once():
    assert plan_forward_chunks(4, 10, 32) == [Chunk(0, 3, 0, 10), Chunk(3, 4, 0, 10)]
    chunks = plan_forward_chunks(2, 700, 32)
    for row in (0, 1):
        mine = [c for c in chunks if c.row_start == row and c.row_end == row + 1]
        assert mine[0].token_start == 0 and mine[-1].token_end == 700
        assert all(a.token_end == b.token_start for a, b in itertools.pairwise(mine))
        sizes = [c.token_end - c.token_start for c in mine]
        assert sizes[0] == 32 and min(sizes[:-1]) == 8 and sizes == sorted(sizes, reverse=True)
        # Later chunks are shorter: each reads the tokens before it, and costs about what the first does.
        costs = [size * c.token_end for size, c in zip(sizes, mine, strict=True) if size > 8]
        assert max(costs) <= 2 * 32 * 32
    assert plan_forward_chunks(1, 5, 512) == [Chunk(0, 1, 0, 5)]
    assert plan_backward_rows(5, 10, 32) == [(0, 3), (3, 5)]
    assert plan_backward_rows(2, 100, 32) == [(0, 1), (1, 2)]


def test_limits_are_checked_on_declared_sizes():
    from engine.server.protocol import RequestError
    from engine.server.work_limits import check_declared

    limits = WorkLimits(max_request_tokens=100, max_request_bytes=1000)
    check_declared("rpc_forward", [(2, 50, 64), (4, 1, 3, 64)], 999, limits)
    with pytest.raises(RequestError, match=r"1000000 tokens .* limit of 100 tokens .*max_request_tokens"):
        check_declared("rpc_forward", [(1, 1_000_000, 64)], 10, limits)
    with pytest.raises(RequestError, match=r"1001 bytes, over .* limit of 1000 bytes .*max_request_bytes"):
        check_declared("rpc_backward", [], 1001, limits)


# --- a real server ---


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", num_layers=4)


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, new_swarm=True, dht_prefix="tiny", request_timeout=3.0, **LIMITS) as host:
        yield host


@pytest.fixture(scope="module")
def client(server):
    with WireClient(list(server.info().multiaddrs)) as wire:
        yield wire


@pytest.fixture(scope="module")
def span(checkpoint):
    return load_block_span(checkpoint, 0, 4)


def test_rpc_info_announces_the_limits(client):
    info = client.info("tiny.0")
    assert info["max_request_tokens"] == 4096
    assert info["max_request_bytes"] == 600_000
    assert info["forward_chunk_tokens"] == 32
    assert client.info("")["max_request_tokens"] == 4096


def _oversized_part(tokens: int) -> runtime_pb2.ExpertRequest:
    # The first part of a streamed forward of [1, tokens, 64] float32: it declares the whole shape.
    tensor = runtime_pb2.Tensor(
        buffer=bytes(4096), size=[1, tokens, HIDDEN], dtype="float32", requires_grad=False
    )
    _, structure = pack_args(torch.empty(0), DUMMY)
    metadata = MSGPackSerializer.dumps({"args_structure": structure})
    return runtime_pb2.ExpertRequest(uid=UIDS, tensors=[tensor], metadata=metadata)


def test_a_million_token_forward_is_refused_up_front(client, server):
    """Issue 12 #1: refused from its first part, before the other 256 MB arrive or anything is computed."""
    done_before = server._pool.stats.tasks_done[TaskKind.FORWARD]

    async def send():
        parts = [_oversized_part(1_000_000)]  # the other parts never come: the server must not wait
        outputs = await client.stub.rpc_forward_stream(iter_as_aiter(parts))
        return [message async for message in outputs]

    began = time.monotonic()
    with pytest.raises(Exception, match=r"1000000 tokens .*limit of 4096 tokens per request"):
        client.run(send(), timeout=20)
    assert time.monotonic() - began < 2.5  # not the request timeout: refused at once
    unary = runtime_pb2.ExpertRequest(
        uid=UIDS, tensors=list(_oversized_part(1_000_000).tensors), metadata=_oversized_part(1).metadata
    )
    with pytest.raises(Exception, match=r"max_request_tokens"):
        client.run(client.stub.rpc_forward(unary), timeout=20)
    with pytest.raises(Exception, match=r"max_request_bytes"):
        client.forward(UIDS, torch.randn(1, 3000, HIDDEN))  # 768,000 bytes
    assert server._pool.stats.tasks_done[TaskKind.FORWARD] == done_before


def test_chunked_forward_and_backward_match_local_compute(client, span):
    hidden = torch.randn(2, 100, HIDDEN)  # 100 tokens per row: 4 chunks per row, sharing a cache
    prompts = torch.randn(4, 2, 40, HIDDEN)  # the prefix crosses a chunk boundary
    expected = span.forward(hidden, prompts)
    assert torch.allclose(client.forward(UIDS, hidden, prompts), expected, atol=1e-4)
    short = torch.randn(5, 10, HIDDEN)  # 3 rows per chunk
    assert torch.allclose(client.forward(UIDS, short), span.forward(short), atol=1e-5)

    inputs, grad_out = torch.randn(3, 20, HIDDEN), torch.randn(3, 20, HIDDEN)
    shared = torch.randn(4, 1, 5, HIDDEN)
    leaves = [inputs.clone().requires_grad_(True), shared.clone().requires_grad_(True)]
    expected_grads = torch.autograd.grad(span.forward(*leaves), leaves, grad_out)
    grad_in, grad_prompts = client.backward(UIDS, inputs, grad_out, shared)
    assert torch.allclose(grad_in, expected_grads[0], atol=1e-5)
    assert grad_prompts.shape == (4, 3, 5, HIDDEN)  # Petals: per-row gradients of shared prompts
    assert torch.allclose(grad_prompts.sum(dim=1, keepdim=True), expected_grads[1], atol=1e-4)


def test_inference_steps_run_between_the_chunks_of_a_long_forward(client, server):
    chunks = len(plan_forward_chunks(1, 1024, LIMITS["forward_chunk_tokens"]))
    done = server._pool.stats.tasks_done
    before = done[TaskKind.FORWARD]
    result = {}
    forward = threading.Thread(
        target=lambda: result.setdefault("out", client.forward(UIDS, torch.randn(1, 1024, HIDDEN)))
    )
    forward.start()
    try:
        assert wait_for(lambda: done[TaskKind.FORWARD] >= before + 2, timeout=30, interval=0.005)
        with client.inference(UIDS, max_length=8) as session:
            session.step(torch.randn(1, 1, HIDDEN))
            ran_meanwhile = done[TaskKind.FORWARD] - before
        assert ran_meanwhile < chunks, "the step waited for the whole forward"
    finally:
        forward.join(60)
    assert result["out"].shape == (1, 1024, HIDDEN)


def test_work_past_its_deadline_is_dropped(client, server):
    """The request times out (3 s) while its chunks wait: none of them runs afterwards."""
    gate = threading.Event()
    blocker = server._pool.submit(gate.wait, 20, kind=TaskKind.FORWARD)  # holds the compute loop
    done = server._pool.stats.tasks_done
    try:
        before = done[TaskKind.FORWARD]
        began = time.monotonic()
        with pytest.raises(Exception, match="request took longer than 3 s"):
            client.forward(UIDS, torch.randn(1, 256, HIDDEN))
        assert time.monotonic() - began < 10
    finally:
        gate.set()
        blocker.result(10)
    time.sleep(0.5)
    assert done[TaskKind.FORWARD] == before + 1  # the blocker only: the expired forward never ran


def test_work_of_a_caller_who_left_stops_at_the_next_chunk(client, server):
    """The client cancels a long streamed forward: the chunks not yet run are dropped within a second."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.utils.streaming import split_for_streaming

    chunks = len(plan_forward_chunks(1, 2048, LIMITS["forward_chunk_tokens"]))
    done = server._pool.stats.tasks_done
    before = done[TaskKind.FORWARD]
    flat, structure = pack_args(torch.randn(1, 2048, HIDDEN), DUMMY)  # 512 KiB: under the byte limit
    metadata = MSGPackSerializer.dumps({"args_structure": structure})
    parts = [
        runtime_pb2.ExpertRequest(uid=UIDS, tensors=[part], metadata=metadata)
        for tensor in flat
        for part in split_for_streaming(serialize_torch_tensor(tensor), 2**16)
    ]

    async def call():
        outputs = await client.stub.rpc_forward_stream(iter_as_aiter(parts))
        return [message async for message in outputs]

    future = asyncio.run_coroutine_threadsafe(call(), client._loop)
    assert wait_for(lambda: done[TaskKind.FORWARD] >= before + 2, timeout=30, interval=0.005)
    future.cancel()  # the caller leaves: its stream closes
    time.sleep(1.5)
    settled = done[TaskKind.FORWARD]
    time.sleep(1.0)
    assert done[TaskKind.FORWARD] == settled < before + chunks, "chunks kept running after the caller left"
