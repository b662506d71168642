"""Inference sessions: one rpc_inference stream per span of the route, fault-tolerant by replay.

Every span remembers the inputs it consumed (its history). When a server fails, the session bans it, asks
for a new route over the failed span's blocks, replays that history (plus the current step) through the new
servers, which rebuilds their KV caches, and goes on. The replay recomputes exactly what the failed server
held, so generation continues with the same outputs. (Petals 2.x asserts on a history length mismatch at
this point and cannot recover; see petals issue #587.)

Server-to-server push (Petals' `next_servers`): each step asks its server to hand the outputs straight to
the servers after it, so the step moves down the chain without coming back to us between hops. The client
still sends every server its own copy (the servers keep whichever arrives first, by step_id), which keeps
the history needed for failover and costs no wait: the pushed reply is already there when we ask. That
wait is therefore no round trip, and min-latency routing learns a server's RTT only from steps not pushed
to it (and from rpc_info): a pushed server would otherwise look a few milliseconds away, however far.

A session's first step (the prompt) is pushed too where the servers announce it (`push_per_step`): the
servers after the first are opened ahead with an empty (0-token) step, so their sessions exist by the time
the previous server pushes. A push that finds no session is dropped and our own copy serves, as before.

Rollback (`start_from_position`): a step may start at an earlier cache position, dropping what follows (the
rejected tokens of speculative decoding). Servers that announce it cut their caches; any other server's
stream is reopened and the kept prefix replayed, so every route can roll back (slowly where unsupported).

Tree steps (`tree_parents`, where every server announces `tree_steps`): a step's last rows form a token
tree (engine/models/tree_step.py); `accept_tree(path)` then keeps one root-to-node path of it. That costs no
trip: each stream compacts its history at once and tells its server with its next step (`tree_accepted`), so
a replacement server replays the compacted history like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger

from engine.client import protocol
from engine.client.routing import Hop
from engine.client.sequence_manager import SequenceManager
from engine.swarm.keys import join_uids

logger = get_logger(__name__)


class SessionClosedError(RuntimeError):
    """The inference session was closed (or failed for good); open a new one."""


class TreeStepsUnsupportedError(RuntimeError):
    """A tree step met a server of the route that takes none (a replacement); the step did not happen."""


class _SpanStream:
    """One server's rpc_inference stream for blocks [hop.start, hop.end); not fault-tolerant by itself."""

    def __init__(self, manager: SequenceManager, hop: Hop, *, max_length: int):
        self.manager, self.hop, self.max_length = manager, hop, max_length
        self.uid = join_uids(manager.uids(hop.start, hop.end))
        self.session_id = str(uuid.uuid4())
        self.history: torch.Tensor | None = None  # inputs the server consumed, [batch, position, hidden]
        self._queue: asyncio.Queue | None = None
        self._replies: AsyncIterator | None = None
        self._compression = runtime_pb2.CompressionType.NONE
        self.supports_rollback = False
        # A Pollinate server: follows next_servers in a session's first message, may be opened ahead
        self.pushes_first_step = False
        self.pushed_to: tuple[str, ...] = ()  # sessions the last step asked our server to push to
        self.replay_prefix: torch.Tensor | None = None  # what its successor replays, when ended by a rollback
        self.supports_trees = False
        self.tree: tuple[int, list[int]] | None = None  # last step's tree: (history index of row 0, parents)
        self._accepted: list[int] | None = None  # the path of that tree to keep, for the next step's metadata
        self._cut: int | None = None  # a position the server must cut back to with the next step
        self.closed = False
        self._unanswered = 0  # replies owed to messages sent without waiting (the opening empty step)

    @property
    def position(self) -> int:
        return 0 if self.history is None else self.history.shape[1]

    def open(self) -> None:
        self.configure(self.manager.rpc_info(self.hop.peer_id, self.hop.start))
        RemoteExpertWorker.run_coroutine(self._open())

    def configure(self, info: dict) -> None:
        """Take what the server's rpc_info says: its compression, whether it can roll back."""
        self._compression = protocol.schema_compression(info, "inference_schema")
        self.supports_rollback = protocol.supports_start_from_position(info)
        self.pushes_first_step = protocol.has_feature(info, "push_per_step")
        self.supports_trees = protocol.has_feature(info, "tree_steps")

    async def _open(self) -> None:
        self._queue = asyncio.Queue()
        stub = protocol.get_stub(self.manager.p2p, self.hop.peer_id)
        self._replies = await asyncio.wait_for(
            stub.rpc_inference(self._requests(self._queue)), self.manager.config.connect_timeout
        )

    @staticmethod
    async def _requests(queue: asyncio.Queue):
        while True:
            message = await queue.get()
            yield message
            if not message.uid and not message.tensors:
                return  # the empty message ends the session

    def step(
        self,
        inputs: torch.Tensor,
        *,
        step_id: str,
        hypo_ids: torch.Tensor | None = None,
        start_from_position: int | None = None,
        next_servers: list | None = None,
        tree_parents: list[int] | None = None,
        pushed: bool = False,
    ) -> torch.Tensor:
        """Send `inputs` [batch, tokens, hidden] (the whole prefix to a new server); return its outputs.

        `start_from_position` < position first cuts the server's cache (and our history) back to it; only
        for a server that supports it. `next_servers` [(peer_id, session_id, start, end), ...] asks the
        server to push its outputs on down the chain (`pushed_to` then names their sessions). `tree_parents`:
        the last rows form a token tree. `pushed`: the previous server was asked to push this step here.
        """
        if self.closed:
            raise SessionClosedError(f"stream to {self.hop.peer_id} is closed")
        metadata = dict(session_id=self.session_id, step_id=step_id)
        history = self.history
        self.pushed_to = ()
        if self.history is None:
            metadata.update(max_length=self.max_length, **self.manager.request_metadata())
            if next_servers and self.pushes_first_step:
                metadata["next_servers"] = next_servers
        else:
            if self._cut is not None:
                metadata["start_from_position"] = self._cut
            if start_from_position is not None and start_from_position < self.position:
                if not self.supports_rollback:
                    raise AssertionError(f"{self.hop.peer_id} cannot roll back: reopen it instead")  # a bug
                metadata["start_from_position"] = start_from_position
                history = history[:, :start_from_position]
            if next_servers:
                metadata["next_servers"] = next_servers
            if self._accepted is not None:
                metadata["tree_accepted"] = self._accepted
        if tree_parents is not None:
            if not self.supports_trees:
                raise AssertionError(f"{self.hop.peer_id} takes no tree steps")  # a bug: the session checks
            metadata["tree_parents"] = list(tree_parents)
        request = protocol.inference_request(
            self.uid, inputs, metadata=metadata, compression=self._compression, hypo_ids=hypo_ids
        )
        started = time.perf_counter()
        reply = RemoteExpertWorker.run_coroutine(self._exchange(request))
        elapsed = time.perf_counter() - started
        if not pushed:  # a pushed step's reply is on its way before we ask: no round trip to learn from
            self.manager.observe_rtt(self.hop.peer_id, elapsed)
        self.pushed_to = tuple(entry[1] for entry in metadata.get("next_servers", ()))
        if not reply.tensors:
            raise protocol.RemoteCallError(f"peer {self.hop.peer_id} sent an inference reply without tensors")
        outputs = protocol.deserialize_torch_tensor(reply.tensors[0])
        if outputs.shape != inputs.shape:
            raise protocol.RemoteCallError(
                f"peer {self.hop.peer_id} returned shape {tuple(outputs.shape)} "
                f"for inputs of shape {tuple(inputs.shape)}"
            )
        self.manager.report_usage(self.hop, inputs.shape[0] * inputs.shape[1], elapsed)
        if history is not None and hypo_ids is not None:
            history = history[hypo_ids]  # the server reorders its cache before the step
        self.history = inputs if history is None else torch.cat([history, inputs], dim=1)
        self._accepted = self._cut = None
        self.tree = (self.position - len(tree_parents), list(tree_parents)) if tree_parents else None
        return outputs

    def discard_after(self, position: int) -> None:
        """Forget our history from `position` on; the server cuts its cache there with the next step."""
        if self.history is not None and self.history.shape[1] > position:
            self.history = self.history[:, :position]
        self._cut, self.tree, self._accepted = position, None, None

    def accept_tree(self, path: list[int]) -> None:
        """Keep `path` of the last step's tree in our history now; the server hears it with the next step."""
        if self.tree is None or self.closed:
            return
        base, _ = self.tree
        kept = self.history[:, [base + row for row in path]]
        self.history = torch.cat([self.history[:, :base], kept], dim=1)
        self.tree, self._accepted = None, list(path)

    def open_ahead(self, batch_size: int, hidden_size: int, dtype: torch.dtype, *, step_id: str) -> None:
        """Open the server's session now with an empty step (its reply is read before the next one's), so
        that the previous server can push the session's first step to it."""
        if self.history is not None or self.closed:
            return
        empty = torch.empty(batch_size, 0, hidden_size, dtype=dtype)
        metadata = dict(session_id=self.session_id, step_id=step_id, max_length=self.max_length)
        metadata.update(self.manager.request_metadata())
        compression = self._compression
        request = protocol.inference_request(self.uid, empty, metadata=metadata, compression=compression)
        RemoteExpertWorker.run_coroutine(self._send(request))
        self._unanswered += 1
        self.history = empty

    def next_server_entry(self) -> tuple[str, str, int, int]:
        """How the previous server names this stream when it pushes to it (Petals' next_servers item)."""
        return (self.hop.peer_id, self.session_id, self.hop.start, self.hop.end)

    async def _exchange(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        await self._send(request)
        while self._unanswered:  # the replies to earlier messages come first (their errors too)
            reply = await self._receive()
            self._unanswered -= 1
            if len(reply.tensors) != 1 or list(reply.tensors[0].size)[1:2] != [0]:
                raise protocol.RemoteCallError(f"peer {self.hop.peer_id} answered an empty step with data")
        return await self._receive()

    async def _send(self, request: runtime_pb2.ExpertRequest) -> None:
        await self._queue.put(request)

    async def _receive(self) -> runtime_pb2.ExpertResponse:
        try:
            return await asyncio.wait_for(anext(self._replies), self.manager.config.request_timeout)
        except StopAsyncIteration:
            raise ConnectionError(f"peer {self.hop.peer_id} closed the inference stream") from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._replies is None:
            return
        try:
            RemoteExpertWorker.run_coroutine(self._aclose())
        except Exception as e:  # the server may be gone already; nothing is left to clean up then
            logger.debug(f"Closing the stream to {self.hop.peer_id} failed: {e!r}")

    def abort(self) -> None:
        """Drop a failed stream without the closing handshake (its server may be gone)."""
        self.closed = True
        queue, self._queue, self._replies = self._queue, None, None
        if queue is not None:
            # Ends our request generator, so the p2p stream is released on our side.
            RemoteExpertWorker.run_coroutine(queue.put(runtime_pb2.ExpertRequest()))

    async def _aclose(self) -> None:
        # As in Petals: a stream that never stepped is just dropped (the server sees no first message).
        if self.history is not None:
            await self._queue.put(runtime_pb2.ExpertRequest())  # empty request: "end of session"
            with contextlib.suppress(StopAsyncIteration):
                await asyncio.wait_for(anext(self._replies), self.manager.config.connect_timeout)


class InferenceSession:
    """A multi-step inference session through the swarm's blocks; use it as a context manager.

    `step(hidden)` sends new hidden states [batch, tokens, hidden] through all blocks and returns the
    outputs of the last block for those tokens; servers keep the KV caches between steps. `output_ids`
    holds the token ids generated so far (used by `generate` to continue a conversation).
    """

    def __init__(self, manager: SequenceManager, *, max_length: int, start: int = 0, end: int | None = None):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.manager = manager
        self.max_length = max_length
        self.start, self.end = start, manager.num_blocks if end is None else end
        self._streams: list[_SpanStream] = []
        self._position = 0
        self._closed = False
        self._tree: tuple[int, list[int]] | None = None  # the last step's tree: (position of row 0, parents)
        self.output_ids: torch.Tensor | None = None

    @property
    def position(self) -> int:
        """Tokens the servers hold in their caches for this session."""
        return self._position

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self._streams]

    @property
    def can_roll_back(self) -> bool:
        """True when every server of the current route cuts its cache itself (see `step`).

        Opens the route if there is none yet; a failure to do so answers False (the next step retries).
        """
        try:
            self.open_route()
        except SessionClosedError:
            raise
        except Exception as e:
            logger.debug(f"Could not open a route to check rollback support: {e!r}")
            return False
        return bool(self._streams) and all(stream.supports_rollback for stream in self._streams)

    @property
    def can_take_trees(self) -> bool:
        """True when every server of the current route announces tree steps (opens the route, as above)."""
        if not self.can_roll_back:
            return False
        return all(stream.supports_trees for stream in self._streams)

    def open_route(self) -> None:
        """Choose the route and open its streams now (the first step does it otherwise)."""
        if self._closed:
            raise SessionClosedError("this inference session is closed")
        if not self._streams:
            self._reroute(0, self.start)

    def __enter__(self) -> InferenceSession:
        if self._closed:
            raise SessionClosedError("this inference session is closed")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End every stream cleanly (servers free the caches); idempotent."""
        if self._closed:
            return
        self._closed = True
        for stream in reversed(self._streams):
            stream.close()
        self._streams.clear()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def step(
        self,
        inputs: torch.Tensor,
        *,
        hypo_ids: torch.Tensor | None = None,
        start_from_position: int | None = None,
        tree_parents: list[int] | None = None,
    ) -> torch.Tensor:
        """Run `inputs` [batch, n, hidden] through blocks [start, end); return outputs [batch, n, hidden].

        With `start_from_position` (<= position), the servers first forget every token from there on.
        `tree_parents` makes the last rows a token tree (see the module docstring; only where
        `can_take_trees`); `accept_tree` then keeps one path of it.
        """
        if self._closed:
            raise SessionClosedError("this inference session is closed")
        if inputs.ndim != 3:
            raise ValueError(f"inputs must be [batch, tokens, hidden], got shape {tuple(inputs.shape)}")
        if start_from_position is not None:
            if not 0 <= start_from_position <= self._position:
                raise ValueError(
                    f"start_from_position must be in [0, {self._position}], got {start_from_position}"
                )
            if hypo_ids is not None and start_from_position < self._position:
                raise ValueError("a step cannot both reorder (hypo_ids) and roll back (start_from_position)")
            self._roll_back(start_from_position)
        n_tokens = inputs.shape[1]
        if tree_parents is not None:
            from engine.models.tree_step import check_parents

            tree_parents = check_parents(tree_parents, n_tokens)
            if hypo_ids is not None:
                raise ValueError("a tree step cannot reorder the batch (hypo_ids)")
        if self._position + n_tokens > self.max_length:
            raise ValueError(
                f"session length exceeded: {self._position} tokens in cache + {n_tokens} new "
                f"> max_length {self.max_length}"
            )
        rollback = start_from_position
        device, dtype = inputs.device, inputs.dtype
        inputs = inputs.detach().cpu()
        step_id = str(uuid.uuid4())
        if self._position == 0 and n_tokens > 0:
            self._open_ahead(inputs)

        x = inputs
        index, block = 0, self.start
        pushed_to: tuple[str, ...] = ()  # where the last server stepped pushes this step
        while block < self.end:
            for attempt_no in itertools.count():
                stream = culprit = None
                try:
                    if index >= len(self._streams) or self._streams[index].closed:
                        prefix = self._streams[index].replay_prefix if index < len(self._streams) else None
                        if prefix is not None and x.shape[1] == n_tokens:
                            x = torch.cat([prefix, x], dim=1)  # ended by a rollback: replay what is kept
                        self._reroute(index, block)
                    stream = self._streams[index]
                    culprit = stream.hop.peer_id
                    if stream.position == 0 and self._position > 0:
                        # A new server: x carries the whole prefix so that it rebuilds the cache.
                        if x.shape[1] != self._position + n_tokens:
                            raise AssertionError("replay input lost its prefix")  # a bug, never retried
                        self._check_trees(stream, tree_parents)
                        out = stream.step(x, step_id=step_id, tree_parents=tree_parents)
                    else:
                        if stream.position > self._position and not stream.supports_rollback:
                            raise AssertionError("a stream that cannot roll back was not reopened")  # a bug
                        self._check_trees(stream, tree_parents)
                        out = stream.step(
                            x[:, -n_tokens:],
                            step_id=step_id,
                            hypo_ids=hypo_ids,
                            start_from_position=rollback,
                            next_servers=self._next_servers(index),
                            tree_parents=tree_parents,
                            pushed=stream.session_id in pushed_to,
                        )
                    self.manager.on_request_success(stream.hop.peer_id)
                    pushed_to = stream.pushed_to
                    x, index, block = out, index + 1, stream.hop.end
                    break
                except AssertionError:
                    self.close()
                    raise
                except TreeStepsUnsupportedError:
                    self._abandon_step(index, x[:, :-n_tokens] if x.shape[1] > n_tokens else None)
                    raise
                except Exception as e:
                    if isinstance(e, _OpenFailed):
                        culprit, e = e.peer_id, e.__cause__ or e
                    self.manager.on_request_failure(culprit)
                    if stream is not None:
                        stream.abort()
                        if stream.history is not None:
                            # Rebuild this span's input prefix so that its replacement can replay it.
                            history = stream.history[:, : self._position]  # minus rolled-back tokens
                            history = history if hypo_ids is None else history[hypo_ids]
                            x = torch.cat([history, x[:, -n_tokens:]], dim=1)
                    if self.manager.gives_up(attempt_no):
                        self.close()
                        raise e
                    delay = self.manager.retry_delay(attempt_no)
                    logger.warning(
                        f"Inference failed at block {block} via {culprit or 'no server'} ({e!r}); "
                        f"retrying in {delay:.1f} s"
                    )
                    time.sleep(delay)
        self._position += n_tokens
        self._tree = (self._position - len(tree_parents), list(tree_parents)) if tree_parents else None
        return x[:, -n_tokens:].to(device=device, dtype=dtype)

    def accept_tree(self, path: list[int]) -> None:
        """After a tree step: keep the tree rows of `path` (a root-to-node path) and forget the others.

        The position becomes the tree's start + len(path); no trip: the servers hear it with the next step."""
        if self._tree is None:
            raise ValueError("accept_tree needs a tree step just before it")
        from engine.models.tree_step import check_path

        base, parents = self._tree
        path = check_path(list(path), parents)
        for stream in self._streams:
            stream.accept_tree(path)
        self._position, self._tree = base + len(path), None

    def _abandon_step(self, index: int, prefix: torch.Tensor | None) -> None:
        """Undo a step that reached the streams before `index` only: they cut it off with their next step;
        the one at `index` (a new server: `prefix` is what it must replay) and the ones after it (which may
        have had the step pushed, their replies unread) reopen and replay instead."""
        for stream in self._streams[:index]:
            stream.discard_after(self._position)
        self._streams[index].replay_prefix = prefix
        self._streams[index].abort()
        for stream in self._streams[index + 1 :]:
            if stream.history is not None and not stream.closed:
                stream.replay_prefix = stream.history[:, : self._position]
                stream.abort()
        self._tree = None

    def _check_trees(self, stream: _SpanStream, tree_parents: list[int] | None) -> None:
        if tree_parents is not None and not stream.supports_trees:
            # A replacement server without tree steps: the caller retries the round without a tree.
            raise TreeStepsUnsupportedError(f"{stream.hop.peer_id} does not take tree steps")

    def _roll_back(self, position: int) -> None:
        """Forget tokens from `position` on: servers that cannot cut their cache get a fresh stream."""
        if position == self._position:
            return
        for stream in self._streams:
            if stream.closed or stream.supports_rollback or stream.history is None:
                continue
            # End its session; the next step opens a new one for these blocks and replays the kept prefix.
            stream.replay_prefix = stream.history[:, :position]
            stream.abort()
        self._position = position

    def _open_ahead(self, inputs: torch.Tensor) -> None:
        """Before a session's first step: open the servers that the first one will push it to (best effort:
        a failure here is met again, and handled, by the step itself)."""
        if not self.manager.config.server_to_server:
            return
        try:
            self.open_route()
            for index in range(1, len(self._streams)):
                if self._streams[index].pushes_first_step and self._pushes_to(index):
                    batch, _, hidden = inputs.shape
                    self._streams[index].open_ahead(batch, hidden, inputs.dtype, step_id=str(uuid.uuid4()))
        except Exception as e:
            logger.debug(f"Could not open the route ahead of the first step: {e!r}")

    def _pushes_to(self, index: int) -> bool:
        """Whether the server before stream `index` is asked to push to it (it is far enough from us)."""
        rtt = self.manager.network_rtt(self._streams[index].hop.peer_id)
        return rtt is None or rtt >= self.manager.config.push_min_rtt

    def _next_servers(self, index: int) -> list | None:
        """The stepped streams right after `index`, for the server at `index` to push to (Petals' rule)."""
        if not self.manager.config.server_to_server or index + 1 >= len(self._streams):
            return None
        if not self._pushes_to(index + 1):
            return None  # the next server is near us: a push would not arrive sooner than our own copy
        entries = []
        for stream in self._streams[index + 1 :]:
            if stream.closed or stream.history is None:
                break
            entries.append(stream.next_server_entry())
        return entries or None

    def _reroute(self, index: int, block: int) -> None:
        """Replace the stream at `index` (failed or missing) with new streams from `block` to its end."""
        end = self._streams[index].hop.end if index < len(self._streams) else self.end
        hops = self.manager.make_sequence(block, end, mode="min_latency", cache_tokens_needed=self.max_length)
        new_streams: list[_SpanStream] = []
        for hop in hops:
            stream = _SpanStream(self.manager, hop, max_length=self.max_length)
            try:
                stream.open()
            except Exception as e:
                for opened in new_streams:
                    opened.close()
                raise _OpenFailed(hop.peer_id) from e
            new_streams.append(stream)
        self._streams[index : index + 1] = new_streams


class _OpenFailed(Exception):
    """Opening a stream to `peer_id` failed (the cause is chained)."""

    def __init__(self, peer_id: str):
        super().__init__(f"could not open an inference stream to {peer_id}")
        self.peer_id = peer_id
