"""Control and status endpoints under /api/ (hosting, status, stats, swarm, hardware, events)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from contract import Quant
from engine.api.events import sse_comment, sse_event
from engine.api.schemas import (
    ErrorResponse,
    Hardware,
    Health,
    HostingPlan,
    HostingResizeRequest,
    HostingStartRequest,
    HostingStopRequest,
    PauseRequest,
    PolicyInfo,
    PolicySettingsBody,
    Stats,
    Status,
    SwarmInfo,
)
from engine.api.threads import run_swarm_read

ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong token"},
    403: {"model": ErrorResponse, "description": "Host header is not loopback"},
}
MODEL_ERRORS = {
    404: {"model": ErrorResponse, "description": "Unknown model"},
    503: {"model": ErrorResponse, "description": "The swarm or engine is not ready"},
}
STATE_ERRORS = {409: {"model": ErrorResponse, "description": "Wrong state"}}
OptionalBody = Body(default=None)
ModelQuery = Query(
    default=None, min_length=1, max_length=1024, description="default: the engine's chat model"
)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api", tags=["control"], responses=ERRORS)

    @router.get("/health", response_model=Health, summary="Liveness (no token needed)")
    async def health(request: Request):
        service = request.app.state.service
        return {"status": "ok", "version": service.version, "pid": service.pid}

    @router.get("/hardware", response_model=Hardware, summary="GPUs, CPU, RAM and disk")
    async def hardware(request: Request):
        return await run_in_threadpool(request.app.state.hardware.read)

    @router.get(
        "/hosting/plan", response_model=HostingPlan, responses=MODEL_ERRORS, summary="What hosting would use"
    )
    async def hosting_plan(
        request: Request,
        model: str | None = ModelQuery,
        quant: Quant | None = None,
        memory_fraction: float | None = Query(default=None, gt=0.0, le=1.0),
    ):
        service = request.app.state.service
        return await run_swarm_read(request, service.hosting_plan, model, quant, memory_fraction)

    @router.post(
        "/hosting/start",
        response_model=Status,
        status_code=202,
        responses={**MODEL_ERRORS, **STATE_ERRORS},
        summary="Start sharing blocks (loading continues in the background)",
    )
    async def hosting_start(request: Request, body: HostingStartRequest | None = OptionalBody):
        body = body or HostingStartRequest()
        service = request.app.state.service
        status = await run_in_threadpool(
            service.start_hosting,
            model=body.model,
            blocks=body.blocks,
            quant=body.quant,
            memory_fraction=body.memory_fraction,
        )
        return JSONResponse(status, status_code=202)

    @router.post(
        "/hosting/resize",
        response_model=Status,
        status_code=202,
        responses={**STATE_ERRORS, 400: {"model": ErrorResponse, "description": "Not even one block fits"}},
        summary="The memory share changed: with blocks auto the span grows or shrinks now (no restart)",
    )
    async def hosting_resize(request: Request, body: HostingResizeRequest):
        service = request.app.state.service
        status = await run_in_threadpool(service.set_memory_share, body.memory_fraction)
        return JSONResponse(status, status_code=202)

    @router.post(
        "/hosting/stop",
        response_model=Status,
        status_code=202,
        responses=STATE_ERRORS,
        summary="Stop sharing: announce OFFLINE, let sessions finish, free memory",
    )
    async def hosting_stop(request: Request, body: HostingStopRequest | None = OptionalBody):
        body = body or HostingStopRequest()
        status = await run_in_threadpool(request.app.state.service.stop_hosting, body.grace_seconds)
        return JSONResponse(status, status_code=202)

    @router.post(
        "/hosting/pause",
        response_model=Status,
        status_code=202,
        responses=STATE_ERRORS,
        summary="Pause sharing for a while (or until resumed): drain, then free or hold the weights",
    )
    async def hosting_pause(request: Request, body: PauseRequest | None = OptionalBody):
        body = body or PauseRequest()
        status = await run_in_threadpool(
            request.app.state.service.pause_for, body.seconds, body.until, body.release, body.grace_seconds
        )
        return JSONResponse(status, status_code=202)

    @router.post(
        "/hosting/resume",
        response_model=Status,
        status_code=202,
        responses=STATE_ERRORS,
        summary="End a pause: serve again (loading the weights again if the pause freed them)",
    )
    async def hosting_resume(request: Request):
        status = await run_in_threadpool(request.app.state.service.resume_sharing, "user")
        return JSONResponse(status, status_code=202)

    @router.get("/policy", response_model=PolicyInfo, summary="Politeness settings, detectors, decision")
    async def policy(request: Request):
        return await run_in_threadpool(request.app.state.service.policy)

    @router.put(
        "/policy", response_model=PolicyInfo, summary="Replace the politeness settings (saved by the engine)"
    )
    async def set_policy(request: Request, body: PolicySettingsBody):
        return await run_in_threadpool(request.app.state.service.set_policy, body.model_dump())

    @router.get("/status", response_model=Status, summary="Hosting state, progress, and why it is paused")
    async def status(request: Request):
        return request.app.state.service.status()

    @router.get("/stats", response_model=Stats, summary="Counters")
    async def stats(request: Request):
        return request.app.state.service.stats()

    @router.get(
        "/swarm", response_model=SwarmInfo, responses=MODEL_ERRORS, summary="Block coverage of a model"
    )
    async def swarm(request: Request, model: str | None = ModelQuery):
        return await run_swarm_read(request, request.app.state.service.swarm_info, model)

    @router.get(
        "/events",
        summary="Server-Sent Events: `status` and `stats` on change, keep-alive comments",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "event stream"}},
    )
    async def events(request: Request):
        app_state = request.app.state
        subscription = app_state.events.subscribe()

        async def stream():
            with subscription:
                # The current state first, so a new listener needs no separate GET.
                yield sse_event("status", app_state.service.status())
                yield sse_event("stats", app_state.service.stats())
                while True:
                    batch = await subscription.next(app_state.keepalive_seconds)
                    if batch is None:  # the engine is stopping
                        return
                    if not batch:
                        yield sse_comment()
                    for kind, data in batch:
                        yield sse_event(kind, data)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return router
