"""Fixtures of the interop tier: the Petals venv, a checkpoint both sides load, reference generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from interop_swarm import MAX_NEW_TOKENS, PROMPT, Reference
from petals_env import PetalsEnvError, ensure_petals_env


def pytest_configure(config):
    # Also belongs in pyproject's marker list; registered here so that the tier runs without warnings.
    config.addinivalue_line("markers", "interop: tests against the published petals package (own venv)")


@pytest.fixture(scope="session")
def petals_python() -> Path:
    """Python of the Petals 2.2 venv (built once, cached); a failed build fails the test with its log."""
    try:
        return ensure_petals_env()
    except PetalsEnvError as exc:
        pytest.fail(str(exc), pytrace=False)


def make_petals_compatible(path: Path) -> Path:
    """Add the config fields transformers 4.34 (Petals 2.2) reads and transformers 5 replaced.

    transformers 5 writes ``rope_parameters`` and ``dtype``; 4.34 ignores both and would silently use its
    default rope_theta. Writing the legacy ``rope_theta``/``torch_dtype`` too keeps both readers in step.
    """
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"transformers 4.34 cannot express rope {rope}; use a default-rope tiny config")
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    config_path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def interop_checkpoint(tmp_path_factory) -> Path:
    """A tiny 4-block llama (sharded safetensors) that Petals 2.2 and Pollinate both load."""
    from engine.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("interop") / "tiny-llama", "llama", num_layers=4)
    return make_petals_compatible(path)


@pytest.fixture(scope="session")
def reference(interop_checkpoint) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(interop_checkpoint, dtype=torch.float32)
    input_ids = torch.tensor([PROMPT])
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        last_logits = model(input_ids).logits[0, -1]
    new_tokens = output[0, len(PROMPT) :].tolist()
    assert len(set(new_tokens)) > len(new_tokens) // 2, f"degenerate reference continuation {new_tokens}"
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]).backward()
    return Reference(output[0].tolist(), last_logits.tolist(), embeds.grad[0].tolist())
