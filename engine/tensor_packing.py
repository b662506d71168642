"""Petals' packing of RPC arguments, in one place for our client and our server (and the tests' wire client).

A request's tensors travel as a flat list; `args_structure` in its metadata is the (args, kwargs) pair with
each tensor replaced by the marker b"__T<i>", the index of that tensor in the flat list. The same tensor
object passed twice is sent once and referenced twice, as Petals 2.x does (`pack_args_kwargs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hivemind.utils.nested import nested_flatten, nested_pack

TENSOR_MARKER = b"__T"
MAX_STRUCTURE_ITEMS = 64  # a packed argument structure has a handful of entries; more is an attack or a bug
MAX_STRUCTURE_DEPTH = 8


class PackingError(ValueError):
    """An args_structure a peer sent that cannot be unpacked (its message says why)."""


def pack_args_kwargs(*args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], Any]:
    """Flatten tensors out of (args, kwargs) and mark their places with b"__T{i}" (Petals' packing)."""
    flat_tensors: list[torch.Tensor] = []
    index_by_id: dict[int, int] = {}
    masked = []
    for value in nested_flatten((args, kwargs)):
        if isinstance(value, torch.Tensor):
            index = index_by_id.setdefault(id(value), len(flat_tensors))
            if index == len(flat_tensors):
                flat_tensors.append(value)
            masked.append(TENSOR_MARKER + str(index).encode())
        else:
            masked.append(value)
    return flat_tensors, nested_pack(masked, (args, kwargs))


def unpack_args_kwargs(flat_tensors: Sequence[torch.Tensor], args_structure: Any) -> Any:
    """Inverse of pack_args_kwargs for structures we made ourselves: (args, kwargs) with tensors in place."""

    def restore(value):
        if is_tensor_marker(value):
            return flat_tensors[int(value[len(TENSOR_MARKER) :])]
        return value

    return nested_pack((restore(v) for v in nested_flatten(args_structure)), args_structure)


def is_tensor_marker(item: Any) -> bool:
    return isinstance(item, bytes) and item.startswith(TENSOR_MARKER)


def unpack_peer_args(flat: Sequence[torch.Tensor], args_structure: Any) -> list[torch.Tensor]:
    """The positional arguments of a structure a peer sent, checked (size, depth, tensor references).

    Without a structure (older clients) the tensors are the arguments in order. Keyword arguments are
    checked and dropped, as Petals 2.2 servers do. Raises PackingError.
    """
    if args_structure is None:
        return list(flat)
    if not isinstance(args_structure, list | tuple) or len(args_structure) != 2:
        raise PackingError("args_structure must be a pair (args, kwargs)")
    args, kwargs = args_structure
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise PackingError("args_structure must be a pair (args tuple, kwargs dict)")
    counter = [0]
    unpacked = [_unpack_item(item, flat, counter, depth=1) for item in args]
    _unpack_item(kwargs, flat, counter, depth=1)  # checked, then dropped
    return unpacked


def _unpack_item(item: Any, flat: Sequence[torch.Tensor], counter: list[int], *, depth: int) -> Any:
    counter[0] += 1
    if counter[0] > MAX_STRUCTURE_ITEMS or depth > MAX_STRUCTURE_DEPTH:
        raise PackingError("args_structure is too large or too deeply nested")
    if is_tensor_marker(item):
        try:
            index = int(item[len(TENSOR_MARKER) :])
        except ValueError:
            raise PackingError(f"bad tensor reference {item!r:.40} in args_structure") from None
        if not 0 <= index < len(flat):
            raise PackingError(f"args_structure refers to tensor {index}, but the request has {len(flat)}")
        return flat[index]
    if isinstance(item, list | tuple):
        return type(item)(_unpack_item(x, flat, counter, depth=depth + 1) for x in item)
    if isinstance(item, dict):
        return {k: _unpack_item(v, flat, counter, depth=depth + 1) for k, v in item.items()}
    return item
