"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions (streaming or not)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from contract import ContextFit
from engine.api.errors import service_error_body
from engine.api.events import sse_event
from engine.api.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)
from engine.api.streaming import GenerationStream, wait_for_disconnect
from engine.api.threads import run_swarm_read
from engine.service import Finished, GenerationRequest, ServiceError, TextDelta

ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong token"},
    403: {"model": ErrorResponse, "description": "Host header is not loopback"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    503: {"model": ErrorResponse, "description": "The swarm cannot serve the model now"},
}
STREAM_DESCRIPTION = "With `stream: true`: text/event-stream of `data: {chunk}` lines, then `data: [DONE]`."


def _sampling(body: ChatCompletionRequest | CompletionRequest) -> dict:
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    return dict(
        model=body.model,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p,
        stop=tuple(body.stop_list()),
        seed=body.seed,
    )


def _usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


class _Completer:
    """Shared flow of both endpoints: open the stream, then answer as SSE or as one JSON document."""

    def __init__(self, request: Request, chat: bool):
        self.request = request
        self.chat = chat
        self.service = request.app.state.service
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    async def run(self, generation: GenerationRequest, stream: bool, include_usage: bool):
        open_streams = self.request.app.state.generations
        open_streams.refuse_if_closed()
        events = GenerationStream(lambda cancel: self.service.generate(generation, cancel))
        open_streams.add(events)  # a shutdown ends it with an error event (and [DONE]) instead of a cut
        try:
            started = await events.start()
        except BaseException:
            events.close()
            open_streams.discard(events)
            raise
        self.fit = ContextFit(
            prompt_tokens=started.prompt_tokens,
            context_length=started.context_length,
            max_tokens=started.max_tokens,
            dropped_messages=started.dropped_messages,
        ).to_dict()
        if stream:
            return StreamingResponse(
                self._sse(events, generation.model, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(events, generation.model)

    async def _whole(self, events: GenerationStream, model: str):
        watcher = asyncio.ensure_future(wait_for_disconnect(self.request.receive))
        collector = asyncio.ensure_future(events.collect())
        try:
            await asyncio.wait({watcher, collector}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():  # the client left: stop generating, answer no one
                events.close()
                collector.cancel()
                return JSONResponse({}, status_code=499)
            text, finished = collector.result()
        finally:
            watcher.cancel()
            events.close()
            self.request.app.state.generations.discard(events)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finished.finish_reason,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finished.finish_reason, "logprobs": None}
            kind = "text_completion"
        answer = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": model,
            "choices": [choice],
            "usage": _usage(finished),
            **({"timings": finished.timings} if finished.timings else {}),
        }
        if self.chat:
            answer["pollinate"] = self.fit
        return answer

    def _chunk(self, model: str, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": model, "choices": [choice]}

    async def _sse(self, events: GenerationStream, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            if self.chat:  # the first chunk also says how the request fits the model's context
                yield sse_event(None, {**self._chunk(model, "", None, first=True), "pollinate": self.fit})
            while (event := await events.next()) is not None:
                if isinstance(event, TextDelta) and event.text:
                    yield sse_event(None, self._chunk(model, event.text, None))
                elif isinstance(event, Finished):
                    yield sse_event(None, self._chunk(model, None, event.finish_reason))
                    if include_usage:
                        usage_chunk = {
                            **self._chunk(model, None, None),
                            "choices": [],
                            "usage": _usage(event),
                            **({"timings": event.timings} if event.timings else {}),
                        }
                        yield sse_event(None, usage_chunk)
        except ServiceError as exc:
            # Headers are out: report the failure in-band, as OpenAI does (its client raises APIError).
            yield sse_event(None, service_error_body(exc)[1])
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            body = {
                "error": {"message": f"Generation failed: {exc!r}", "type": "internal_error", "code": 500}
            }
            yield sse_event(None, body)
        finally:
            events.close()
            self.request.app.state.generations.discard(events)
        yield sse_event(None, "[DONE]")


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)

    @router.get("/models", response_model=ModelList, summary="Models the swarm can serve, and the demo model")
    async def list_models(request: Request):
        entries = await run_swarm_read(request, request.app.state.service.list_models)
        return {"object": "list", "data": entries}

    @router.post(
        "/chat/completions",
        response_model=ChatCompletion,
        summary="Chat completion (OpenAI-compatible)",
        description=STREAM_DESCRIPTION,
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = tuple((message.role, message.text()) for message in body.messages)
        fit = bool(body.pollinate and body.pollinate.fit_context)
        generation = GenerationRequest(messages=messages, fit_context=fit, **_sampling(body))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _Completer(request, chat=True).run(generation, body.stream, include_usage)

    @router.post(
        "/completions",
        response_model=Completion,
        summary="Text completion (OpenAI-compatible)",
        description=STREAM_DESCRIPTION,
    )
    async def completions(body: CompletionRequest, request: Request):
        generation = GenerationRequest(prompt=body.prompt_text(), **_sampling(body))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _Completer(request, chat=False).run(generation, body.stream, include_usage)

    return router
