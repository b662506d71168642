"""Petals' argument packing lives in one module: what our client packs, our server unpacks."""

from __future__ import annotations

import pytest
import torch

from engine import tensor_packing
from engine.client import protocol as client_protocol
from engine.server import protocol as server_protocol


def test_client_packs_what_the_server_unpacks():
    hidden, prompts = torch.randn(1, 3, 8), torch.empty(0)
    flat, structure = client_protocol.pack_args_kwargs(hidden, prompts, hidden)
    assert structure == ((b"__T0", b"__T1", b"__T0"), {})  # Petals 2.x's shape: one tensor sent once
    args = server_protocol.unpack_args(flat, structure)
    assert args[0] is hidden and args[2] is hidden and args[1] is prompts
    assert client_protocol.pack_args_kwargs is tensor_packing.pack_args_kwargs


def test_bad_structures_from_peers_are_request_errors():
    with pytest.raises(server_protocol.RequestError, match="refers to tensor 3"):
        server_protocol.unpack_args([torch.zeros(1)], ((b"__T3",), {}))
    deep: list = []
    for _ in range(tensor_packing.MAX_STRUCTURE_DEPTH + 1):
        deep = [deep]
    with pytest.raises(server_protocol.RequestError, match="too deeply nested"):
        server_protocol.unpack_args([], (tuple(deep), {}))
