"""The local swarm's tiny demo model (random weights, built offline on first use) and how demo servers split.

The local swarm serves SmolLM2-135M-Instruct by default (engine/smollm2.py); this tiny Llama is the fast
alternative (`--demo-model tiny`) that tests use. Its replies are gibberish by design, and every place that
shows it says so (DEMO_MODEL_LABEL).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from contract.stores import open_store
from engine import paths
from engine.models.tiny import DEMO_MODEL_LABEL, DEMO_MODEL_NAME, build_tiny_checkpoint, is_tiny_checkpoint

# Bump when the demo checkpoint's recipe changes, so old copies are rebuilt.
DEMO_RECIPE_VERSION = 1
DEMO_NUM_BLOCKS = 8
DEMO_HIDDEN_SIZE = 128

__all__ = ["DEMO_MODEL_LABEL", "DEMO_MODEL_NAME", "demo_model_path", "demo_spans", "ensure_demo_model"]


def demo_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    """Split blocks 0..num_blocks into `servers` contiguous spans of near-equal size (earlier ones larger)."""
    if not 1 <= servers <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks among {servers} servers")
    size, extra = divmod(num_blocks, servers)
    spans, start = [], 0
    for index in range(servers):
        end = start + size + (1 if index < extra else 0)
        spans.append((start, end))
        start = end
    return spans


def demo_model_path(data_dir: Path | None = None) -> Path:
    """Folder where the demo checkpoint lives (it may not exist yet)."""
    return (data_dir or paths.data_dir()) / "models" / DEMO_MODEL_NAME


def _read_facts(path: Path) -> dict | None:
    """The demo folder's facts file; None if there is no folder; ValueError if it is damaged."""
    if not path.exists():
        return None
    if not is_tiny_checkpoint(path) or not any(path.glob("*.safetensors")):
        raise ValueError("the model folder is incomplete")
    json.loads((path / "config.json").read_text())
    facts = json.loads((path / "pollinate_tiny.json").read_text())
    if not isinstance(facts, dict):
        raise ValueError("the model's facts file is not a JSON object")
    return facts


def ensure_demo_model(data_dir: Path | None = None) -> Path:
    """Return the demo checkpoint's folder, building it (a few seconds, no network) if missing or stale."""
    path = demo_model_path(data_dir)
    facts, _aside = open_store(path, _read_facts, store="demo model", notices=path.parent.parent)
    if facts is not None and facts.get("recipe") == DEMO_RECIPE_VERSION:
        return path
    # Build beside the target and move it in place, so a crash mid-build never leaves a half model.
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_checkpoint(
        staging,
        "llama",
        num_layers=DEMO_NUM_BLOCKS,
        hidden_size=DEMO_HIDDEN_SIZE,
        seed=2024,
        max_shard_size="200KB",
    )
    facts = json.loads((staging / "pollinate_tiny.json").read_text())
    facts.update(recipe=DEMO_RECIPE_VERSION, name=DEMO_MODEL_NAME, label=DEMO_MODEL_LABEL)
    (staging / "pollinate_tiny.json").write_text(json.dumps(facts, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path
