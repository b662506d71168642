"""The Petals 2.x wire format as a client speaks it: RPC stubs, argument packing, single-server calls.

Facts (read from Petals 2.2 `client/inference_session.py`, `client/remote_forward_backward.py`,
`utils/packaging.py`, `server/handler.py`):
- RPCs live on a handler class named `TransformerConnectionHandler`; hivemind names a handle
  "TransformerConnectionHandler.rpc_x", so a stub class of that name is all a client needs.
- A request's `uid` is the space-joined block uids of the span. Metadata is a msgpack dict.
- Tensors travel as a flat list; `args_structure` in the metadata says how they nest:
  ((b"__T0", b"__T1", ...), {}) for positional tensors (Petals' pack_args_kwargs).
- rpc_inference: tensors (hidden_states, prompts, hypo_ids); prompts empty float32 and hypo_ids empty
  int64 when unused. The first message's metadata holds session_id, step_id, max_length, points,
  active_adapter, args_structure; later ones session_id, step_id, args_structure. An empty
  ExpertRequest ends the session. Each step's reply carries the span's output hidden states.
- rpc_forward: (hidden_states, prompts); rpc_backward: (inputs, grad_outputs, prompts). Both are unary
  under MAX_UNARY_PAYLOAD_SIZE // 2 bytes, else the *_stream variant with tensors split into parts.
- Every tensor is serialized in its own dtype with the compression of the server's first schema entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind spots streaming RPCs by typing's alias only

import torch
from hivemind.compression import deserialize_tensor_stream, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor  # noqa: F401  (registers its msgpack type)

from engine.swarm.keys import join_uids
from engine.tensor_packing import pack_args_kwargs, unpack_args_kwargs  # noqa: F401  (the client's packing)

DUMMY = torch.empty(0)  # stands for "no deep prompts"
DUMMY_INT64 = torch.empty(0, dtype=torch.int64)  # stands for "no hypo_ids"


class RemoteCallError(RuntimeError):
    """A server answered a request with something we cannot use (wrong shape, empty reply, ...)."""


def is_dummy(tensor: torch.Tensor | None) -> bool:
    return tensor is None or tensor.numel() == 0


class TransformerConnectionHandler(ServicerBase):
    """Client-side declaration of the Petals handler's RPCs; only `get_stub` is used here."""

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError
        yield

    async def rpc_push(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError


def get_stub(p2p: P2P, peer_id: str | PeerID):
    """A stub whose rpc_* coroutines call the Petals-compatible handler of `peer_id`."""
    if isinstance(peer_id, str):
        peer_id = PeerID.from_base58(peer_id)
    return TransformerConnectionHandler.get_stub(p2p, peer_id)


def schema_compression(rpc_info: dict, key: str) -> int:
    """The compression a server asks for (its schema's first tensor), NONE if it does not say."""
    try:
        schema = rpc_info[key][0]
        return schema[0].compression
    except (KeyError, IndexError, TypeError, AttributeError):
        return runtime_pb2.CompressionType.NONE


def supports_start_from_position(rpc_info: dict) -> bool:
    """Whether a server announces that its inference steps may start at an earlier cache position.

    Petals 2.2 servers do not (they would ignore the field and append), so they are never sent it.
    """
    return has_feature(rpc_info, "start_from_position")


def has_feature(rpc_info: dict, name: str) -> bool:
    """Whether a server announces the Pollinate extension `name` in its rpc_info (Petals 2.2: none)."""
    features = rpc_info.get("pollinate_features")
    return isinstance(features, list | tuple) and name in features


def serialize_tensors(tensors: Sequence[torch.Tensor], compression: int) -> list[runtime_pb2.Tensor]:
    return [serialize_torch_tensor(t.detach().cpu(), compression) for t in tensors]


def inference_request(
    uid: str,
    hidden_states: torch.Tensor,
    *,
    metadata: dict[str, Any],
    compression: int,
    prompts: torch.Tensor | None = None,
    hypo_ids: torch.Tensor | None = None,
) -> runtime_pb2.ExpertRequest:
    """One rpc_inference step message; `metadata` gets the args_structure of the packed tensors."""
    prompts = DUMMY if is_dummy(prompts) else prompts
    hypo_ids = DUMMY_INT64 if is_dummy(hypo_ids) else hypo_ids.to(torch.int64)
    tensors, args_structure = pack_args_kwargs(hidden_states, prompts, hypo_ids)
    metadata = dict(metadata, args_structure=args_structure)
    return runtime_pb2.ExpertRequest(
        uid=uid, tensors=serialize_tensors(tensors, compression), metadata=MSGPackSerializer.dumps(metadata)
    )


async def fetch_rpc_info(p2p: P2P, peer_id: str, block_uid: str, *, timeout: float) -> dict:
    """The server's rpc_info for one block (schemas, version, cache_tokens_available)."""
    stub = get_stub(p2p, peer_id)
    reply = await stub.rpc_info(runtime_pb2.ExpertUID(uid=block_uid), timeout=timeout)
    info = MSGPackSerializer.loads(reply.serialized_info)
    if not isinstance(info, dict):
        raise RemoteCallError(f"peer {peer_id} sent rpc_info of type {type(info).__name__}")
    return info


async def _call(
    stub, name: str, uid: str, tensors, metadata: bytes, *, timeout: float, connect_timeout: float
):
    size = sum(len(t.buffer) for t in tensors)
    if size <= MAX_UNARY_PAYLOAD_SIZE // 2:
        reply = await getattr(stub, name)(
            runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=metadata), timeout=timeout
        )
        return [deserialize_torch_tensor(t) for t in reply.tensors]

    async def parts():
        for tensor in tensors:
            for part in split_for_streaming(tensor, DEFAULT_MAX_MSG_SIZE):
                yield runtime_pb2.ExpertRequest(uid=uid, tensors=[part], metadata=metadata)

    replies = await asyncio.wait_for(getattr(stub, name + "_stream")(parts()), connect_timeout)

    async def reply_tensors():
        while True:
            try:
                message = await asyncio.wait_for(anext(replies), timeout)
            except StopAsyncIteration:
                return
            yield message.tensors

    return await deserialize_tensor_stream(reply_tensors())


async def run_forward(
    p2p: P2P,
    peer_id: str,
    uids: Sequence[str],
    hidden_states: torch.Tensor,
    *,
    rpc_info: dict,
    metadata: dict[str, Any],
    timeout: float,
    connect_timeout: float,
    prompts: torch.Tensor | None = None,
) -> torch.Tensor:
    """rpc_forward (or rpc_forward_stream for big inputs) on one server: hidden states through `uids`."""
    tensors, args_structure = pack_args_kwargs(hidden_states, DUMMY if is_dummy(prompts) else prompts)
    compression = schema_compression(rpc_info, "forward_schema")
    serialized = await asyncio.get_running_loop().run_in_executor(
        None, serialize_tensors, tensors, compression
    )
    meta = MSGPackSerializer.dumps(dict(metadata, args_structure=args_structure))
    outputs = await _call(
        get_stub(p2p, peer_id),
        "rpc_forward",
        join_uids(uids),
        serialized,
        meta,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    if not outputs or outputs[0].shape != hidden_states.shape:
        raise RemoteCallError(f"peer {peer_id} returned {[tuple(o.shape) for o in outputs]} for forward")
    return outputs[0]


async def run_backward(
    p2p: P2P,
    peer_id: str,
    uids: Sequence[str],
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    *,
    rpc_info: dict,
    metadata: dict[str, Any],
    timeout: float,
    connect_timeout: float,
    prompts: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """rpc_backward on one server: gradients w.r.t. the span's inputs (and its deep prompts, if sent)."""
    tensors, args_structure = pack_args_kwargs(inputs, grad_outputs, DUMMY if is_dummy(prompts) else prompts)
    compression = schema_compression(rpc_info, "forward_schema")
    serialized = await asyncio.get_running_loop().run_in_executor(
        None, serialize_tensors, tensors, compression
    )
    meta = MSGPackSerializer.dumps(dict(metadata, args_structure=args_structure))
    grads = await _call(
        get_stub(p2p, peer_id),
        "rpc_backward",
        join_uids(uids),
        serialized,
        meta,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    if not grads or grads[0].shape != inputs.shape:
        raise RemoteCallError(f"peer {peer_id} returned {[tuple(g.shape) for g in grads]} for backward")
    return grads
