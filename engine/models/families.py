"""Imports every family module so each registers itself; add one line here per new family."""

from engine.models import bloom, falcon, llama, mistral, mixtral, qwen2, qwen3  # noqa: F401
