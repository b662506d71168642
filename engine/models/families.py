"""Imports every family module so each registers itself; add one line here per new family."""

from engine.models import llama, mistral, qwen2  # noqa: F401
