"""FastAPI factory: `create_app(service, token)` wires security, errors, routes and the event bus."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from engine.api import control, openai
from engine.api.auth import PUBLIC_PATHS, SecurityMiddleware
from engine.api.errors import install_error_handlers
from engine.api.events import EventBus
from engine.api.hardware import HardwareProbe
from engine.api.streaming import OpenStreams
from engine.service.errors import EngineNotReadyError

KEEPALIVE_SECONDS = 15.0


def _finish_schema(app: FastAPI) -> None:
    """Document the bearer token (the middleware enforces it) and 400 instead of FastAPI's 422."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = FastAPI.openapi(app)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The engine's API token (see engine-state.json)",
        }
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                operation.get("responses", {}).pop("422", None)
                if not (path in PUBLIC_PATHS and method == "get"):
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def end_open_streams(app: FastAPI) -> None:
    """The engine is stopping: end event streams, and end each generation with an error event and [DONE]."""
    app.state.events.close()
    app.state.generations.abort_all(
        EngineNotReadyError(
            "The engine is shutting down, so this reply was cut short. Send it again once the engine runs."
        )
    )


def create_app(service, token: str, *, keepalive_seconds: float = KEEPALIVE_SECONDS) -> FastAPI:
    """The engine's HTTP API over `service` (an EngineService or anything with its methods)."""
    app = FastAPI(
        title="Pollinate engine API",
        version=service.version,
        description="OpenAI-compatible chat over the swarm, and control of this engine. See docs/API.md.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.events = EventBus()
    app.state.generations = OpenStreams()
    app.state.hardware = HardwareProbe(service.data_dir)
    app.state.keepalive_seconds = keepalive_seconds
    service.add_listener(app.state.events.publish)
    install_error_handlers(app)
    app.include_router(openai.build_router())
    app.include_router(control.build_router())
    _finish_schema(app)
    app.add_middleware(SecurityMiddleware, token=token)
    return app
