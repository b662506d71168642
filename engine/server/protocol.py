"""The Petals 2.x request format, read and written: uids, msgpack metadata, packed tensor arguments, schemas.

Everything here is pure (no I/O, no compute) and treats its input as hostile: a malformed request raises
RequestError with a message that says what was wrong, and the server goes on serving others.

Facts from Petals 2.2 (server/handler.py, block_functions.py, utils/packaging.py, client/*):
- request uid = block uids joined by " ", e.g. "llama-hf.3 llama-hf.4"; they must be hosted here.
- metadata = msgpack dict: points, active_adapter, args_structure, output_compression (forward/backward);
  rpc_inference's first message adds session_id, step_id, max_length, alloc_timeout; later messages carry
  session_id, step_id, args_structure and optionally next_servers / pushed / start_from_position, and
  (Pollinate's `tree_steps`) tree_parents / tree_accepted.
- tensors = pack_args_kwargs(...) flattened, with args_structure = ((args...), {}) where each tensor is
  replaced by b"__T<index>": forward (hidden, prompts), backward (inputs, grad_outputs, prompts),
  inference (hidden, prompts, hypo_ids). An empty tensor ("DUMMY") means "no prompts" / "no hypo_ids".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from engine.swarm.keys import CHAIN_DELIMITER, InvalidUidError, parse_block_uid
from engine.tensor_packing import PackingError, unpack_peer_args

MAX_ID_LENGTH = 256  # session ids and step ids are uuid4 strings in Petals
# Petals advertises (batch, 2048, hidden) in every schema; clients read only dtype and compression.
SCHEMA_MAX_LENGTH = 2048
# rpc_info key listing the extensions this server implements beyond Petals 2.2. "start_from_position": an
# inference step may say where in the cache it starts (the cache is cut back there first), which rolls back
# rejected speculative tokens. Petals 2.2 servers ignore that field, so clients use it only where announced.
# "push_per_step": each step's own `next_servers` is followed, the session's first step included (Petals 2.2
# pushes every step with its first message's metadata, so a client asks it for no push in that message), and a
# session opened by an empty step takes its first real step by push.
# "tree_steps" (only where the hosted blocks can: BlockSpan.supports_trees): a step's metadata may carry
# `tree_parents` (its last rows form a token tree, engine/models/tree_step.py) and the next step's
# `tree_accepted` (the root-to-node path of that tree to keep; the other rows are dropped), see read_tree.
FEATURES_KEY = "pollinate_features"
FEATURES = ("start_from_position", "push_per_step")
TREE_FEATURE = "tree_steps"


class RequestError(ValueError):
    """A peer's request is malformed or asks for what this server does not do; sent back as the reply."""


class _RefusalsOnOneLine(logging.Filter):
    """hivemind logs every exception a streaming handler raises as a warning with its traceback. A
    RequestError is this server refusing a request on purpose (malformed, over a limit, leaving the swarm;
    the peer gets the message as its reply): a bad or unlucky peer must not fill the log with tracebacks,
    and a stopping server with one per client still trying it. It stays visible as one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestError):
            record.msg, record.args = "refused a request: %s", (error,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


_REFUSALS_FILTER = _RefusalsOnOneLine()


def log_refusals_on_one_line() -> None:
    """Install the filter on hivemind's p2p logger (idempotent: a filter is added once per logger)."""
    logging.getLogger("hivemind.p2p.p2p_daemon").addFilter(_REFUSALS_FILTER)


# --- uids and metadata ---


def parse_span(uid_chain: str, dht_prefix: str, hosted: tuple[int, int]) -> tuple[int, int]:
    """The block range [start, end) a request uid names; contiguous, ascending and hosted here."""
    if not isinstance(uid_chain, str) or not uid_chain:
        raise RequestError("the request names no blocks (empty uid)")
    uids = uid_chain.split(CHAIN_DELIMITER)
    indices = []
    for uid in uids:
        try:
            prefix, index = parse_block_uid(uid)
        except InvalidUidError as error:
            raise RequestError(f"bad block uid: {error}") from None
        if prefix != dht_prefix or not hosted[0] <= index < hosted[1]:
            raise RequestError(
                f"this server does not serve {uid!r}; it serves {dht_prefix}.{hosted[0]} to "
                f"{dht_prefix}.{hosted[1] - 1}"
            )
        indices.append(index)
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise RequestError(f"blocks must be consecutive and ascending, got indices {indices}")
    return indices[0], indices[-1] + 1


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """The msgpack metadata dict of a request ({} when absent)."""
    if not raw:
        return {}
    try:
        metadata = MSGPackSerializer.loads(raw)
    except Exception as error:  # msgpack raises many types on garbage input
        raise RequestError(f"metadata is not valid msgpack: {error}") from None
    if not isinstance(metadata, dict):
        raise RequestError(f"metadata must be a msgpack dict, got {type(metadata).__name__}")
    return metadata


def read_number(metadata: dict, key: str, default: float, *, minimum: float = 0.0) -> float:
    """A numeric metadata field (int or float, not bool), at least `minimum`."""
    value = metadata.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < minimum:
        raise RequestError(f"metadata {key!r} must be a number >= {minimum}, got {value!r:.80}")
    return float(value)


def read_id(metadata: dict, key: str) -> str | None:
    """An optional id field (session_id, step_id): a short string, or None."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str | bytes) or len(value) > MAX_ID_LENGTH:
        raise RequestError(f"metadata {key!r} must be a string of at most {MAX_ID_LENGTH} characters")
    return value if isinstance(value, str) else value.hex()


def read_max_length(metadata: dict, limit: int) -> int:
    """max_length of a new inference session: an int in [0, limit]."""
    value = metadata.get("max_length")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"rpc_inference metadata must contain an int max_length, got {value!r:.80}")
    if not 0 <= value <= limit:
        raise RequestError(f"cannot allocate KV cache for {value} tokens: this server's limit is {limit}")
    return value


def read_active_adapter(metadata: dict, adapters: Sequence[str]) -> str:
    """The requested LoRA adapter name ("" for none); it must be one this server loaded."""
    value = metadata.get("active_adapter") or ""
    if not isinstance(value, str):
        raise RequestError("metadata 'active_adapter' must be a string")
    if value and value not in adapters:
        raise RequestError(
            f"adapter {value!r} is not loaded on this server (loaded: {list(adapters) or 'none'})"
        )
    return value


def read_output_compression(metadata: dict, count: int) -> tuple[int, ...] | None:
    """Per-output compression the client asked for (Petals' output_compression), or None for the schema's."""
    value = metadata.get("output_compression")
    if value is None:
        return None
    valid = set(runtime_pb2.CompressionType.values())
    if (
        not isinstance(value, list | tuple)
        or len(value) != count
        or not all(isinstance(c, int) and not isinstance(c, bool) and c in valid for c in value)
    ):
        raise RequestError(f"output_compression must be {count} compression type numbers, got {value!r:.80}")
    return tuple(value)


# --- tensors ---


def deserialize(tensors: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    """Tensors of a request, decoded."""
    try:
        return [deserialize_torch_tensor(tensor) for tensor in tensors]
    except Exception as error:
        raise RequestError(f"cannot decode a request tensor: {error}") from None


def serialize(tensors: Sequence[torch.Tensor], dtype: torch.dtype, compressions: Sequence[int]) -> list:
    """Encode outputs in the server's dtype with the given compression per tensor."""
    return [
        serialize_torch_tensor(tensor.detach().to(device="cpu", dtype=dtype), compression, allow_inplace=True)
        for tensor, compression in zip(tensors, compressions, strict=True)
    ]


def unpack_args(flat: Sequence[torch.Tensor], args_structure: Any) -> list[torch.Tensor]:
    """Positional tensor arguments of a request, restored from Petals' pack_args_kwargs structure."""
    try:
        return unpack_peer_args(flat, args_structure)
    except PackingError as error:
        raise RequestError(str(error)) from None


def _tensor_arg(args: list, index: int, name: str) -> torch.Tensor | None:
    if index >= len(args) or args[index] is None:
        return None
    value = args[index]
    if not isinstance(value, torch.Tensor):
        raise RequestError(f"argument {name} must be a tensor, got {type(value).__name__}")
    return value


def check_hidden(tensor: torch.Tensor | None, name: str, hidden_size: int, *, allow_empty: bool = False):
    """A [batch, tokens, hidden_size] floating tensor (tokens may be 0 only where Petals allows it)."""
    if tensor is None:
        raise RequestError(f"the request has no {name} tensor")
    if not tensor.is_floating_point():
        raise RequestError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() != 3 or tensor.shape[2] != hidden_size or tensor.shape[0] < 1:
        raise RequestError(f"{name} must have shape [batch, tokens, {hidden_size}], got {list(tensor.shape)}")
    if tensor.shape[1] == 0 and not allow_empty:
        raise RequestError(f"{name} has no tokens")
    return tensor


def check_prompts(prompts: torch.Tensor | None, num_blocks: int, batch: int, length: int, hidden: int):
    """Deep prompts [num_blocks, batch or 1, prefix <= length, hidden]; None for the empty "DUMMY"."""
    if prompts is None or prompts.numel() == 0:
        return None
    if not prompts.is_floating_point():
        raise RequestError(f"prompts must be a floating-point tensor, got {prompts.dtype}")
    if (
        prompts.dim() != 4
        or prompts.shape[0] != num_blocks
        or prompts.shape[1] not in (1, batch)
        or prompts.shape[2] > length
        or prompts.shape[3] != hidden
    ):
        raise RequestError(
            f"prompts must have shape [{num_blocks} blocks, {batch} or 1, prefix <= {length}, {hidden}], "
            f"got {list(prompts.shape)}"
        )
    return prompts


def check_hypo_ids(hypo_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Beam reordering ids: int64 [batch] with values in [0, batch), or None for the empty tensor."""
    if hypo_ids is None or hypo_ids.numel() == 0:
        return None
    if hypo_ids.dtype != torch.int64:
        raise RequestError(f"hypo_ids must be int64, got {hypo_ids.dtype}")
    if hypo_ids.shape != (batch,):
        raise RequestError(f"hypo_ids must have shape [{batch}], got {list(hypo_ids.shape)}")
    if hypo_ids.min() < 0 or hypo_ids.max() >= batch:
        raise RequestError(f"hypo_ids must lie in [0, {batch}), got {hypo_ids.tolist()[:16]}")
    return hypo_ids


# --- parsed requests ---


@dataclass(frozen=True)
class ForwardArgs:
    """rpc_forward: hidden states [batch, tokens, hidden] and optional deep prompts."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None


@dataclass(frozen=True)
class BackwardArgs:
    """rpc_backward: the span's inputs, the gradient of its outputs, optional deep prompts."""

    inputs: torch.Tensor
    grad_outputs: torch.Tensor
    prompts: torch.Tensor | None


@dataclass(frozen=True)
class StepArgs:
    """One rpc_inference step: new hidden states, optional prompts, optional beam reordering."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None
    hypo_ids: torch.Tensor | None


def parse_forward(flat: Sequence[torch.Tensor], args_structure: Any, num_blocks: int, hidden_size: int):
    """ForwardArgs from the tensors of an rpc_forward request."""
    args = unpack_args(flat, args_structure)
    hidden = check_hidden(_tensor_arg(args, 0, "hidden_states"), "hidden_states", hidden_size)
    batch, length, _ = hidden.shape
    prompts = check_prompts(_tensor_arg(args, 1, "prompts"), num_blocks, batch, length, hidden_size)
    return ForwardArgs(hidden, prompts)


def parse_backward(flat: Sequence[torch.Tensor], args_structure: Any, num_blocks: int, hidden_size: int):
    """BackwardArgs from the tensors of an rpc_backward request."""
    args = unpack_args(flat, args_structure)
    inputs = check_hidden(_tensor_arg(args, 0, "inputs"), "inputs", hidden_size)
    grad_outputs = check_hidden(_tensor_arg(args, 1, "grad_outputs"), "grad_outputs", hidden_size)
    if grad_outputs.shape != inputs.shape:
        raise RequestError(
            f"grad_outputs must have the shape of inputs {list(inputs.shape)}, got {list(grad_outputs.shape)}"
        )
    batch, length, _ = inputs.shape
    prompts = check_prompts(_tensor_arg(args, 2, "prompts"), num_blocks, batch, length, hidden_size)
    return BackwardArgs(inputs, grad_outputs, prompts)


def parse_step(
    flat: Sequence[torch.Tensor], args_structure: Any, num_blocks: int, hidden_size: int, batch_size: int
) -> StepArgs:
    """StepArgs from the tensors of one rpc_inference message; the batch must match the session's."""
    args = unpack_args(flat, args_structure)
    hidden = check_hidden(
        _tensor_arg(args, 0, "hidden_states"), "hidden_states", hidden_size, allow_empty=True
    )
    batch, length, _ = hidden.shape
    if batch != batch_size:
        raise RequestError(f"this session was opened for batch size {batch_size}, got a step with {batch}")
    prompts = check_prompts(_tensor_arg(args, 1, "prompts"), num_blocks, batch, max(length, 1), hidden_size)
    hypo_ids = check_hypo_ids(_tensor_arg(args, 2, "hypo_ids"), batch)
    return StepArgs(hidden, prompts, hypo_ids)


@dataclass(frozen=True)
class TreeArgs:
    """A step's tree metadata: parents of its last rows (None: an ordinary step), the previous tree's path
    to keep (None: nothing to compact)."""

    parents: list[int] | None
    accepted: list[int] | None


def read_tree(metadata: dict, new_tokens: int, previous_parents: Sequence[int] | None) -> TreeArgs:
    """`tree_parents` / `tree_accepted` of a step, checked (tree_step.py); `previous_parents`: the tree of
    the session's previous step, the only one `tree_accepted` may refer to (None when it was no tree step)."""
    from engine.models.tree_step import check_parents, check_path

    parents, accepted = metadata.get("tree_parents"), metadata.get("tree_accepted")
    try:
        if parents is not None:
            parents = check_parents(parents, new_tokens)
        if accepted is not None:
            if previous_parents is None:
                raise ValueError(
                    "tree_accepted names rows of a tree, but the previous step was not a tree step"
                )
            accepted = check_path(accepted, previous_parents)
    except ValueError as error:
        raise RequestError(str(error)) from None
    return TreeArgs(parents, accepted)


def batch_size_of(request: runtime_pb2.ExpertRequest) -> int:
    """Batch size of an inference session, from its first message (as Petals reads it, before decoding)."""
    if not request.tensors or not request.tensors[0].size:
        return 1
    return int(request.tensors[0].size[0])


# --- rpc_info ---


def rpc_info(
    *,
    version: str,
    dht_client_mode: bool,
    cache_tokens_available: int,
    hidden_size: int,
    dtype: torch.dtype,
    compression: int,
    with_block_info: bool,
    features: Sequence[str] = FEATURES,
) -> dict[str, Any]:
    """The dict Petals' rpc_info returns (msgpack'ed by the caller).

    Server keys: version, dht_client_mode, cache_tokens_available, and our FEATURES_KEY. Block keys (when a
    uid was asked for, as Petals clients do): forward_schema = ((hidden,), {}), outputs_schema = (hidden,),
    keyword_names = (), inference_schema = ((hidden, prompts, hypo_ids), {}). Clients take dtype and
    compression from them.
    """
    info: dict[str, Any] = {
        "version": version,
        "dht_client_mode": bool(dht_client_mode),
        "cache_tokens_available": int(cache_tokens_available),
        FEATURES_KEY: list(features),
    }
    if with_block_info:
        hidden = BatchTensorDescriptor(
            1, SCHEMA_MAX_LENGTH, hidden_size, dtype=dtype, compression=compression
        )
        args_schema = (hidden,)
        info.update(
            forward_schema=(args_schema, {}),
            outputs_schema=(hidden,),
            keyword_names=(),
            inference_schema=(
                (
                    *args_schema,
                    BatchTensorDescriptor((), dtype=dtype),
                    BatchTensorDescriptor((), dtype=torch.int64),
                ),
                {},
            ),
        )
    return info


def compression_type(name: str) -> int:
    """The hivemind CompressionType number of a config name such as "none" or "float16"."""
    return runtime_pb2.CompressionType.Value(name.upper())
