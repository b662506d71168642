"""The RPC handlers of a block server, in the Petals 2.2 wire format (hivemind P2P, runtime_pb2, msgpack).

The class name is protocol: hivemind registers each method as "TransformerConnectionHandler.<name>",
which is what Petals clients call. This layer reads requests (protocol.py), runs them on the compute loop
(compute.py through the TaskPool) and writes replies; a bad request gets its own error, nothing else fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import AsyncIterator  # noqa: UP035 - hivemind spots streaming rpcs by typing's alias only

import torch
from hivemind.compression import deserialize_tensor_stream
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon import DEFAULT_MAX_MSG_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming

from engine.server import protocol
from engine.server.compute import HostedSpan, SessionState, run_backward, run_forward, run_inference_step
from engine.server.memory_cache import MemoryCache
from engine.server.peer_gate import PeerGate
from engine.server.protocol import RequestError
from engine.server.step_timing import StepTimes
from engine.server.task_pool import TaskKind, TaskPool
from engine.server.work_limits import (
    WorkLimits,
    check_declared,
    check_tokens,
    plan_backward_rows,
    plan_forward_chunks,
)
from engine.swarm.keys import CHAIN_DELIMITER

logger = logging.getLogger(__name__)

# An inference step of at most this many tokens (x batch) runs on the event loop thread when the compute loop
# is idle (TaskPool.run_if_idle): a decode or speculative step takes milliseconds, and skipping the hand-off
# to the compute thread and back saves two thread wake-ups per step. Longer steps (prefills) always queue, so
# the event loop is never held for long.
INLINE_STEP_TOKENS = 16

# priority_fn(peer_id, kind, points) -> delay in seconds (lower = sooner; see task_pool). The peer id is the
# libp2p-authenticated remote; `points` is what the peer declares and should not be trusted.
PriorityFn = Callable[[str, TaskKind, float], float]
# usage_fn(peer_id, kind, tokens, blocks, compute_seconds): told about every request served.
UsageFn = Callable[[str, TaskKind, int, int, float], None]


@dataclass(frozen=True)
class HandlerLimits:
    """Timeouts and limits the handler enforces (taken from ServerConfig)."""

    inference_max_length: int = 2048
    request_timeout: float = 180.0
    session_timeout: float = 1800.0
    step_timeout: float = 300.0
    default_alloc_timeout: float = 0.0
    work: WorkLimits = field(default_factory=WorkLimits)


@dataclass
class HandlerStats:
    """What this server has served since it started (read by the host's info())."""

    requests: int = 0
    tokens: int = 0
    sessions_open: int = 0
    errors: int = 0


class TransformerConnectionHandler(ServicerBase):
    """Serves rpc_info, rpc_forward(_stream), rpc_backward(_stream), rpc_inference and rpc_push for a span."""

    def __init__(
        self,
        *,
        hosted: HostedSpan,
        pool: TaskPool,
        memory_cache: MemoryCache,
        dht_prefix: str,
        limits: HandlerLimits = HandlerLimits(),
        compression: int = runtime_pb2.CompressionType.NONE,
        adapters: Sequence[str] = (),
        dht_client_mode: bool = False,
        version: str = "",
        priority_fn: PriorityFn | None = None,
        usage_fn: UsageFn | None = None,
    ):
        protocol.log_refusals_on_one_line()
        self.hosted, self.pool, self.memory_cache = hosted, pool, memory_cache
        self.dht_prefix, self.limits, self.compression = dht_prefix, limits, compression
        self.adapters, self.dht_client_mode, self.version = tuple(adapters), dht_client_mode, version
        self.priority_fn, self.usage_fn = priority_fn, usage_fn
        self.stats = HandlerStats()
        self._p2p: P2P | None = None
        self._session_queues: dict[str, asyncio.Queue] = {}
        self._background: set[asyncio.Task] = set()
        # Requests per peer in progress at once: steps (a person waits for each) and forward/backward each
        # have their own gate, so a peer's long forward does not hold up its own chat. Two forward/backward
        # slots: with one, a peer's next request reached the queue only after its previous one returned, so
        # two busy peers simply alternated and earned priority (engine.ledger) no longer ordered them.
        self._gate, self._work_gate = PeerGate(slots=1), PeerGate(slots=2)
        # Drain (engine/server/drain.py): a paused handler refuses new work; `_leaving` ends open sessions.
        self._refusal: str | None = None
        self._leaving = asyncio.Event()
        self.max_sessions: int | None = None  # throttle: inference sessions served at once (None: no limit)

    # --- drain ---------------------------------------------------------------------------------------------

    def refuse_new_work(self, reason: str) -> None:
        """From now on every new request fails at once with `reason` (clients then try another server)."""
        self._refusal = reason

    def end_open_sessions(self) -> None:
        """Make every open inference session fail at its next step boundary (call on the handler's loop).

        The client sees an error, bans us and replays its history to another server (same tokens).
        """
        self._leaving.set()

    def accept_work(self) -> None:
        """Undo refuse_new_work / end_open_sessions (call on the handler's loop)."""
        self._refusal = None
        self._leaving.clear()

    def _check_accepting(self) -> None:
        if self._refusal is not None:
            raise RequestError(self._refusal)

    async def add_p2p_handlers(self, p2p: P2P, *args, **kwargs) -> None:
        """Register the rpc_* methods on `p2p` (and keep it for server-to-server pushes)."""
        self._p2p = p2p
        await super().add_p2p_handlers(p2p, *args, **kwargs)

    # --- rpc_info ------------------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """Server facts, plus the block schemas when a uid is given (Petals clients send one)."""
        if request.uid:
            self._parse_span(request.uid)
        info = protocol.rpc_info(
            version=self.version,
            dht_client_mode=self.dht_client_mode,
            cache_tokens_available=self.memory_cache.tokens_left(self.hosted.cache_bytes_per_token()),
            hidden_size=self.hosted.hidden_size,
            dtype=self.hosted.dtype,
            compression=self.compression,
            with_block_info=bool(request.uid),
            features=self._features(),
        )
        info.update(self.limits.work.announced())
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    def _features(self) -> tuple[str, ...]:
        span = self.hosted.span
        trees = span is not None and span.supports_trees
        return protocol.FEATURES + ((protocol.TREE_FEATURE,) if trees else ())

    # --- forward / backward --------------------------------------------------------------------------------

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Hidden states after the requested blocks (no cache): Petals' training and batch forward."""
        self._check_declared("rpc_forward", request.tensors)
        tensors = await self._with_timeout(
            self._gated(context, self._forward, request.uid, request.tensors, request.metadata)
        )
        return runtime_pb2.ExpertResponse(tensors=tensors)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_forward for payloads over the unary size limit: tensors arrive and leave in parts."""
        uid, flat, metadata = await self._with_timeout(self._gather(requests, "rpc_forward"))
        tensors = await self._with_timeout(self._gated(context, self._forward, uid, flat, metadata))
        for tensor in tensors:
            for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Gradients w.r.t. the inputs (and deep prompts, if sent) of the requested blocks."""
        self._check_declared("rpc_backward", request.tensors)
        tensors = await self._with_timeout(
            self._gated(context, self._backward, request.uid, request.tensors, request.metadata)
        )
        return runtime_pb2.ExpertResponse(tensors=tensors)

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_backward with streamed tensors."""
        uid, flat, metadata = await self._with_timeout(self._gather(requests, "rpc_backward"))
        tensors = await self._with_timeout(self._gated(context, self._backward, uid, flat, metadata))
        for tensor in tensors:
            for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def _gated(self, context: P2PContext, method, uid: str, tensors, raw_metadata: bytes) -> list:
        # One peer's requests beyond its slots wait here, before decoding: they cost others nothing.
        async with self._work_gate.enter(_peer(context)):
            if tensors and isinstance(tensors[0], runtime_pb2.Tensor):
                tensors = protocol.deserialize(tensors)
            return await method(uid, tensors, raw_metadata, context)

    async def _forward(self, uid: str, flat, raw_metadata: bytes, context: P2PContext) -> list:
        self._check_accepting()
        start, end = self._parse_span(uid)
        metadata = protocol.parse_metadata(raw_metadata)
        points = protocol.read_number(metadata, "points", 0.0)
        protocol.read_active_adapter(metadata, self.adapters)
        args = protocol.parse_forward(
            flat, metadata.get("args_structure"), end - start, self.hosted.hidden_size
        )
        compressions = protocol.read_output_compression(metadata, 1) or (self.compression,)
        batch, length = args.hidden.shape[:2]
        check_tokens("rpc_forward", batch * length, self.limits.work)
        self._log("rpc_forward", start, end, context)
        peer = _peer(context)
        priority = self._priority(peer, TaskKind.FORWARD, points)
        view = self.hosted.view(start, end)
        rows: dict[int, list] = {}
        session, seconds = None, 0.0
        # Each chunk is its own task: other peers' steps run between them, and if this request is cancelled
        # (caller gone, deadline passed) the chunks not yet run are dropped from the queue.
        for chunk in plan_forward_chunks(batch, length, self.limits.work.forward_chunk_tokens):
            hidden = args.hidden[chunk.row_start : chunk.row_end, chunk.token_start : chunk.token_end]
            rows_and_tokens = (chunk.row_start, chunk.row_end, chunk.token_start, chunk.token_end)
            prompts = _prompt_part(args.prompts, *rows_and_tokens)
            if chunk.token_end - chunk.token_start == length:
                call = (run_forward, view, hidden, prompts)
            else:  # part of a long sequence: the chunks of its rows share a KV cache
                if chunk.first_of_rows:
                    session = SessionState(view, chunk.row_end - chunk.row_start, length)
                call = (run_inference_step, session, hidden, prompts, None, None)
            cost = hidden[..., 0].numel()
            output, spent = await self.pool.run(
                _timed, *call, kind=TaskKind.FORWARD, priority=priority, peer=peer, cost=cost
            )
            rows.setdefault(chunk.row_start, []).append(output)
            seconds += spent
        outputs = torch.cat([torch.cat(parts, dim=1) for parts in rows.values()], dim=0)
        self._count(peer, TaskKind.FORWARD, batch * length, end - start, seconds)
        return protocol.serialize([outputs], self.hosted.dtype, compressions)

    async def _backward(self, uid: str, flat, raw_metadata: bytes, context: P2PContext) -> list:
        self._check_accepting()
        start, end = self._parse_span(uid)
        metadata = protocol.parse_metadata(raw_metadata)
        points = protocol.read_number(metadata, "points", 0.0)
        protocol.read_active_adapter(metadata, self.adapters)
        args = protocol.parse_backward(
            flat, metadata.get("args_structure"), end - start, self.hosted.hidden_size
        )
        count = 1 if args.prompts is None else 2
        compressions = protocol.read_output_compression(metadata, count) or (self.compression,) * count
        batch, length = args.inputs.shape[:2]
        check_tokens("rpc_backward", batch * length, self.limits.work)
        self._log("rpc_backward", start, end, context)
        peer = _peer(context)
        priority = self._priority(peer, TaskKind.BACKWARD, points)
        view = self.hosted.view(start, end)
        parts, seconds = [], 0.0
        for row_start, row_end in plan_backward_rows(batch, length, self.limits.work.forward_chunk_tokens):
            grads, spent = await self.pool.run(
                _timed,
                run_backward,
                view,
                args.inputs[row_start:row_end],
                args.grad_outputs[row_start:row_end],
                _prompt_part(args.prompts, row_start, row_end, 0, length),
                kind=TaskKind.BACKWARD,
                priority=priority,
                peer=peer,
                cost=(row_end - row_start) * length * 3,  # about three forwards' work
            )
            parts.append(grads)
            seconds += spent
        columns = enumerate(zip(*parts, strict=True))  # [grad_inputs (, grad_prompts)] per row group
        grads = [torch.cat(column, dim=0 if i == 0 else 1) for i, column in columns]
        self._count(peer, TaskKind.BACKWARD, batch * length, end - start, seconds)
        return protocol.serialize(grads, self.hosted.dtype, compressions)

    async def _gather(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], method: str):
        # Streamed requests: uid and metadata come with the first part; every part must name the same uid.
        # The limits are checked part by part: an oversized request is refused before it is all received.
        uid = metadata = None
        received = 0

        async def parts():
            nonlocal uid, metadata, received
            async for request in requests:
                if uid is None:
                    uid, metadata = request.uid, request.metadata
                elif request.uid and request.uid != uid:
                    raise RequestError("parts of one streamed request name different blocks")
                received += sum(len(tensor.buffer) for tensor in request.tensors)
                shapes = [tuple(tensor.size) for tensor in request.tensors if tensor.size]
                check_declared(method, shapes, received, self.limits.work)
                yield request.tensors

        try:
            flat = await deserialize_tensor_stream(parts())
        except RequestError:
            raise
        except Exception as error:
            raise RequestError(f"cannot decode the streamed tensors: {error}") from None
        return uid or "", flat, metadata or b""

    # --- inference -----------------------------------------------------------------------------------------

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A multi-step inference session with a KV cache kept here between steps.

        The first message opens the session (uid, max_length, session_id, ...) and usually carries the first
        step; each message with tensors is one step and gets one reply; a message without tensors, or the end
        of the stream, closes the session and frees its cache.
        """
        deadline = time.monotonic() + self.limits.session_timeout
        try:
            first = await asyncio.wait_for(anext(requests), self.limits.step_timeout)
        except (StopAsyncIteration, TimeoutError):
            return
        self._check_accepting()
        if self.max_sessions is not None and self.stats.sessions_open >= self.max_sessions:
            raise RequestError(
                f"this server already serves its owner's limit of {self.max_sessions} sessions; "
                "use another server"
            )
        start, end = self._parse_span(first.uid)
        metadata = protocol.parse_metadata(first.metadata)
        max_length = protocol.read_max_length(metadata, self.limits.inference_max_length)
        points = protocol.read_number(metadata, "points", 0.0)
        protocol.read_active_adapter(metadata, self.adapters)
        session_id = protocol.read_id(metadata, "session_id")
        alloc_timeout = protocol.read_number(metadata, "alloc_timeout", self.limits.default_alloc_timeout)
        args_structure = metadata.get("args_structure")
        batch_size = protocol.batch_size_of(first)
        if batch_size < 1:
            raise RequestError(f"batch size must be at least 1, got {batch_size}")
        if not first.tensors:
            return  # nothing to compute: Petals closes such a session at once
        peer = _peer(context)
        self._log("rpc_inference.open", start, end, context, f"max_length={max_length}, batch={batch_size}")
        nbytes = self.hosted.cache_bytes(end - start, batch_size, max_length)
        times = StepTimes()
        view = None
        self.stats.sessions_open += 1
        try:
            async with (
                self.memory_cache.allocate(nbytes, alloc_timeout),
                self._open_session(session_id) as pushes,
            ):
                view = self.hosted.view(start, end)
                session = SessionState(view, batch_size, max_length)
                steps = self._iterate_steps(first, requests, pushes, session, deadline, context)
                async for request, step_metadata in steps:
                    arrived = time.perf_counter()
                    async with self._gate.enter(peer):  # a peer's 50 sessions do not fill the event loop
                        outputs, tokens, has_prompts, seconds, inline = await self._inference_step(
                            session, request, step_metadata, args_structure, points, peer
                        )
                    computed = time.perf_counter()
                    times.step(arrived, computed, seconds, inline)
                    self._count(peer, TaskKind.INFERENCE, tokens, end - start, seconds)
                    if step_metadata.get("next_servers") and not has_prompts:
                        # Petals' server-to-server mode: hand our outputs straight to the next server. The
                        # push goes out first: the next server's compute waits for it, the client does not.
                        self._spawn(self._push_outputs(request, outputs[0], step_metadata))
                        await asyncio.sleep(0)
                    yield runtime_pb2.ExpertResponse(tensors=outputs)
                    times.replied(computed)
        finally:
            self.stats.sessions_open -= 1
            self._log("rpc_inference.close", start, end, context)
            logger.debug("rpc_inference(blocks=%d:%d) step times: %s", start, end, times.summary())
            tuner = view.step_tuner() if view is not None else None
            if tuner is not None and logger.isEnabledFor(logging.DEBUG):
                logger.debug("step plans (kernel/threads, median): %s", tuner.summary())

    async def _inference_step(
        self, session: SessionState, request, step_metadata, args_structure, points, peer
    ):
        flat = protocol.deserialize(request.tensors)
        structure = step_metadata.get("args_structure", args_structure)
        hosted = self.hosted
        num_blocks = session.view.num_blocks
        args = protocol.parse_step(flat, structure, num_blocks, hosted.hidden_size, session.batch_size)
        start_from = step_metadata.get("start_from_position")
        new_tokens = args.hidden.shape[1]
        tree = protocol.read_tree(step_metadata, new_tokens, session.tree_parents)
        if tree.parents is not None and protocol.TREE_FEATURE not in self._features():
            raise RequestError(
                "this server's blocks do not take tree steps (it does not announce tree_steps)"
            )
        if tree.parents is not None and (args.prompts is not None or args.hypo_ids is not None):
            raise RequestError("a tree step cannot carry deep prompts or hypo_ids")
        position = session.position
        if tree.accepted is not None:
            position = session.tree_base + len(tree.accepted)
        if start_from is not None:
            if (
                isinstance(start_from, bool)
                or not isinstance(start_from, int)
                or not 0 <= start_from <= position
            ):
                raise RequestError(
                    f"start_from_position must be an int in [0, {position}], got {start_from!r:.40}"
                )
            position = start_from
        if position + new_tokens > session.max_length:
            raise RequestError(
                f"Maximum length exceeded: prefix {position} + current {new_tokens} exceeds "
                f"pre-allocated maximum {session.max_length}"
            )
        call = (_timed, run_inference_step, session, args.hidden, args.prompts, args.hypo_ids, start_from)
        call += (tree.parents, tree.accepted)
        cost = max(args.hidden.numel() // hosted.hidden_size, 1)
        inline = False
        if cost <= INLINE_STEP_TOKENS:
            inline, result = self.pool.run_if_idle(*call, kind=TaskKind.INFERENCE, peer=peer, cost=cost)
        if inline:
            outputs, seconds = result
        else:
            outputs, seconds = await self.pool.run(
                *call,
                kind=TaskKind.INFERENCE,
                priority=self._priority(peer, TaskKind.INFERENCE, points / max(session.max_length, 1)),
                peer=peer,
                cost=cost,
            )
        serialized = protocol.serialize([outputs], hosted.dtype, (self.compression,))
        return serialized, new_tokens * session.batch_size, args.prompts is not None, seconds, inline

    async def _iterate_steps(self, first, requests, pushes: asyncio.Queue | None, session, deadline, context):
        """Steps of a session, from the client or pushed by the previous server; each step_id once."""
        request = first
        next_request = next_push = leaving = None
        try:
            while request.tensors:
                if self._leaving.is_set():
                    raise RequestError(self._refusal or "this server is leaving the swarm")
                metadata = protocol.parse_metadata(request.metadata)
                step_id = protocol.read_id(metadata, "step_id")
                if step_id is None or step_id not in session.processed_step_ids:
                    if step_id is not None:
                        session.processed_step_ids.add(step_id)
                    yield request, metadata
                else:  # the same step arrived twice (pushed by the previous server and sent by the client)
                    logger.debug("step %s arrived again (pushed=%s)", step_id, bool(metadata.get("pushed")))

                remaining = min(self.limits.step_timeout, deadline - time.monotonic())
                if remaining <= 0:
                    raise RequestError(
                        f"inference session exceeded the session limit of {self.limits.session_timeout:g} s"
                    )
                if next_request is None:
                    next_request = asyncio.ensure_future(anext(requests))
                if leaving is None:
                    leaving = asyncio.ensure_future(self._leaving.wait())
                waiting = {next_request, leaving}
                if pushes is not None:
                    if next_push is None:
                        next_push = asyncio.ensure_future(pushes.get())
                    waiting.add(next_push)
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if next_request in done:
                    try:
                        request = next_request.result()
                    except StopAsyncIteration:
                        return  # the client closed its side of the stream: the session ends
                    next_request = None
                elif next_push is not None and next_push in done:
                    request, next_push = next_push.result(), None
                elif leaving in done:
                    # Drain: the grace period is over. Failing the step makes the client replay elsewhere.
                    raise RequestError(self._refusal or "this server is leaving the swarm")
                else:
                    self._log(
                        "rpc_inference.step", session.view.start, session.view.end, context, "timed out"
                    )
                    raise RequestError(
                        f"no inference step for {self.limits.step_timeout:g} s: the session was closed"
                    )
        finally:
            for task in (next_request, next_push, leaving):
                if task is not None:
                    task.cancel()

    @contextlib.asynccontextmanager
    async def _open_session(self, session_id: str | None):
        if session_id is None:
            yield None
            return
        if session_id in self._session_queues:
            raise RequestError(f"session id {session_id!r} is already open on this server; use a fresh id")
        queue: asyncio.Queue = asyncio.Queue()
        self._session_queues[session_id] = queue
        try:
            yield queue
        finally:
            self._session_queues.pop(session_id, None)

    # --- server-to-server pushes ---------------------------------------------------------------------------

    async def rpc_push(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Accept a step pushed by the previous server of a client's chain (Petals' server-to-server mode)."""
        self._parse_span(request.uid)
        metadata = protocol.parse_metadata(request.metadata)
        session_id = protocol.read_id(metadata, "session_id")
        queue = self._session_queues.get(session_id) if session_id is not None else None
        if queue is None:
            logger.debug("ignored rpc_push to unknown session %s", session_id)
        elif queue.qsize() < 64:  # a session takes one step at a time; more queued pushes are a flood
            queue.put_nowait(request)
        return runtime_pb2.ExpertResponse()

    async def _push_outputs(
        self, request: runtime_pb2.ExpertRequest, output: runtime_pb2.Tensor, metadata: dict
    ):
        # Best effort, as in Petals: the client sends the same step itself, so a failed push only costs time.
        try:
            next_servers = metadata["next_servers"]
            peer_id, session_id, start, end = next_servers[0]
            uid = CHAIN_DELIMITER.join(f"{self.dht_prefix}.{i}" for i in range(int(start), int(end)))
            next_metadata = dict(
                metadata, session_id=session_id, next_servers=list(next_servers[1:]), pushed=True
            )
            stub = self.get_stub(self._p2p, PeerID.from_base58(peer_id))
            await stub.rpc_push(
                runtime_pb2.ExpertRequest(
                    uid=uid,
                    tensors=[output, *request.tensors[1:]],
                    metadata=MSGPackSerializer.dumps(next_metadata),
                ),
                timeout=self.limits.request_timeout,
            )
        except Exception as error:
            logger.debug("push to the next server failed: %r", error)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)  # keep a reference until done, or the task may be garbage-collected
        task.add_done_callback(self._background.discard)

    # --- helpers -------------------------------------------------------------------------------------------

    def _check_declared(self, method: str, tensors) -> None:
        nbytes = sum(len(tensor.buffer) for tensor in tensors)
        check_declared(method, [tuple(tensor.size) for tensor in tensors], nbytes, self.limits.work)

    def _parse_span(self, uid: str) -> tuple[int, int]:
        return protocol.parse_span(uid, self.dht_prefix, (self.hosted.start, self.hosted.end))

    async def _with_timeout(self, coroutine):
        try:
            return await asyncio.wait_for(coroutine, self.limits.request_timeout)
        except TimeoutError:
            raise RequestError(f"request took longer than {self.limits.request_timeout:g} s") from None

    def _priority(self, peer: str, kind: TaskKind, points: float) -> float:
        if self.priority_fn is None:
            return 0.0
        try:
            priority = float(self.priority_fn(peer, kind, points))
        except Exception:
            logger.warning("priority callback failed", exc_info=True)
            return 0.0
        return priority if math.isfinite(priority) else 0.0  # a NaN would break the queue's ordering

    def _count(self, peer: str, kind: TaskKind, tokens: int, blocks: int, seconds: float) -> None:
        self.stats.requests += 1
        self.stats.tokens += int(tokens)
        if self.usage_fn is not None:
            try:
                self.usage_fn(peer, kind, int(tokens), int(blocks), float(seconds))
            except Exception:
                logger.warning("usage callback failed", exc_info=True)

    def _log(self, method: str, start: int, end: int, context: P2PContext, note: str | None = None) -> None:
        remote = "..." + str(context.remote_id)[-6:]
        logger.info(
            "%s(blocks=%d:%d, remote_peer=%s)%s", method, start, end, remote, f": {note}" if note else ""
        )


def _prompt_part(prompts, row_start: int, row_end: int, token_start: int, token_end: int):
    """The part of deep prompts [blocks, batch or 1, prefix, hidden] over rows x [token_start, token_end)."""
    if prompts is None or token_start >= prompts.shape[2]:
        return None
    if prompts.shape[1] != 1:
        prompts = prompts[:, row_start:row_end]
    return prompts[:, :, token_start:token_end]


def _timed(fn, *args):
    # Runs on the compute thread, so the time is compute only (the queue wait is not counted).
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def _peer(context: P2PContext) -> str:
    return context.remote_id.to_base58() if context.remote_id is not None else ""
