"""The engine's local HTTP API: OpenAI-compatible /v1 endpoints and /api control (docs/API.md)."""

from engine.api.app import create_app

__all__ = ["create_app"]
