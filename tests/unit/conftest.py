"""Fixtures shared by the client unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf(tiny_checkpoint_factory):
    """A 2-block tiny Llama as a float32 transformers model in eval mode, loaded once: the local reference the
    speculative loop's tests run against. Tests must leave it as they found it (hooks removed); a module that
    needs another model defines its own `hf`."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama", num_layers=2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
