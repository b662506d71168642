"""Pydantic models of the local HTTP API: request bodies (validated) and answers (documented in OpenAPI).

The OpenAI-compatible models accept unknown fields (clients such as Open WebUI send many), and keep only
what the engine honours; the control models are strict, so a typo in a field name is a 400, not a no-op.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

import contract
from contract import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT, SEED_RANGE, Quant


def _from_record(record: type) -> type[BaseModel]:
    """The response model of a contract record: the same fields, all present in every answer."""
    hints = typing.get_type_hints(record)
    docs = contract.field_docs(record)
    fields = {f.name: (hints[f.name], Field(description=docs[f.name])) for f in dataclasses.fields(record)}
    return create_model(record.__name__, __doc__=record.__doc__, **fields)


class _Checked(BaseModel):
    """Every string field is checked for lone surrogates (the tokenizer would fail on them with a 500)."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value):
        for text in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
            if isinstance(text, str):
                _check_unicode(text)
        return value


class _Strict(_Checked):
    model_config = ConfigDict(extra="forbid")


class _Lenient(_Checked):
    model_config = ConfigDict(extra="ignore")


def _check_unicode(text: str) -> None:
    """Refuse text with a lone UTF-16 surrogate (a JSON "\\ud800" without its pair): it is no character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        raise ValueError(
            f"contains a lone UTF-16 surrogate (U+{code:04X}) at character {error.start}: "
            "send each character whole (a surrogate pair, or the character itself in UTF-8)"
        ) from None


# ---- errors -------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong, in words a person can act on; `missing_blocks` only for swarm_unavailable."""

    model_config = ConfigDict(extra="allow")
    message: str
    type: str
    code: int
    missing_blocks: list[int] | None = None


class ErrorResponse(BaseModel):
    """Every error answer: `{"error": {...}}`, OpenAI style."""

    error: ErrorDetail


# ---- OpenAI-compatible --------------------------------------------------------------------------------


class TextPart(_Lenient):
    """One part of a multi-part message; only text parts are understood."""

    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    """One chat message; a list of text parts is joined into one string."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = Field(default=False, strict=True)


Stop = (
    str
    | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]], Field(max_length=MAX_STOP_SEQUENCES)]
)


class _SamplingFields(_Lenient):
    model: str = Field(min_length=1, max_length=1024)
    # strict: OpenAI refuses "yes", "10" or true for these; quietly coercing them hides a client's bug.
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, strict=True, description="0 = greedy; default 1"
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, strict=True)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    stop: Stop | None = None
    seed: int | None = Field(default=None, ge=-SEED_RANGE, le=SEED_RANGE, strict=True)
    n: int | None = Field(default=None, ge=1, le=1, strict=True, description="only 1 is supported")

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value):
        if isinstance(value, str) and len(value) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_LENGTH} characters")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class ChatOptions(_Strict):
    """Pollinate's own options of a chat request (other clients leave them out)."""

    fit_context: bool = Field(
        default=False,
        description="leave out the oldest turns (never the system prompt nor the last message) and lower "
        "max_tokens to fit the model's context, instead of answering 400",
    )


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    pollinate: ChatOptions | None = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions (a single prompt string)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculationCounters(BaseModel):
    rounds: int = Field(description="trips through the swarm")
    drafted: int = Field(description="draft tokens sent for verification")
    accepted: int = Field(description="draft tokens the full model agreed with")
    acceptance: float | None = Field(description="accepted / drafted")
    tokens_per_round: float | None = Field(description="tokens produced per trip through the swarm")
    drafter: str | None = Field(
        default=None, description="what drafted: feature, prompt_lookup, ngram, early_exit or draft_model"
    )
    tree_rounds: int = Field(
        default=0, description="rounds that verified a token tree (several candidates) instead of a chain"
    )


class Timings(BaseModel):
    """Speed of one completion (names as in llama.cpp's server); in the answer and the usage chunk."""

    prompt_ms: float | None = Field(description="request start to the first new token")
    predicted_n: int = Field(description="tokens generated")
    predicted_ms: float | None = Field(description="from the first new token to the last")
    predicted_per_second: float | None = Field(description="decode rate after the first token")
    speculation: SpeculationCounters | None = Field(
        default=None, description="speculative decoding's counters (absent when it is off)"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


ContextFit = _from_record(contract.ContextFit)


class ChatCompletion(BaseModel):
    """Non-streaming answer of /v1/chat/completions (streaming sends `chat.completion.chunk` events; the
    first one carries `pollinate` too)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    pollinate: ContextFit | None = None
    timings: Timings | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    """Non-streaming answer of /v1/completions."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    timings: Timings | None = None


PollinateModelFacts = _from_record(contract.ModelFacts)


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "pollinate-swarm"
    pollinate: PollinateModelFacts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


# ---- control ------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    pid: int


class GpuInfo(BaseModel):
    index: int
    name: str
    backend: str
    total_bytes: int
    free_bytes: int


class CpuInfo(BaseModel):
    name: str
    cores: int


class RamInfo(BaseModel):
    total_bytes: int
    available_bytes: int


class DiskInfo(BaseModel):
    path: str
    total_bytes: int
    free_bytes: int


class Hardware(BaseModel):
    gpus: list[GpuInfo]
    cpu: CpuInfo
    ram: RamInfo
    disk: DiskInfo


HostingPlan = _from_record(contract.HostingPlan)


class HostingStartRequest(_Strict):
    """Body of POST /api/hosting/start; every field is optional."""

    model: str | None = Field(default=None, min_length=1, max_length=1024)
    blocks: str | None = Field(
        default=None,
        pattern=r"^(auto|\d{1,6}|\d{1,6}:\d{1,6})$",
        description='"auto" (as many blocks as fit in the memory share, placed and moved where the swarm '
        'needs them; resized when the share or free memory changes), "N" (N blocks, placed and moved the '
        'same way) or "A:B" (exactly that span; never moved)',
    )
    quant: Quant | None = None
    memory_fraction: float | None = Field(default=None, gt=0.0, le=1.0)

    @field_validator("blocks")
    @classmethod
    def _span_not_empty(cls, value):
        if value and ":" in value:
            start, end = (int(x) for x in value.split(":"))
            if start >= end:
                raise ValueError(f"block span {value} is empty: it must be A:B with A < B")
        elif value and value != "auto" and int(value) < 1:
            raise ValueError("blocks must be at least 1 (or A:B, or auto)")
        return value


class HostingResizeRequest(_Strict):
    """Body of POST /api/hosting/resize: the user's new memory share."""

    memory_fraction: float = Field(gt=0.0, le=1.0, description="share of free memory hosting may use")


class HostingStopRequest(_Strict):
    grace_seconds: float | None = Field(default=None, ge=0.0, le=3600.0)


class PauseRequest(_Strict):
    """Body of POST /api/hosting/pause: `seconds`, or `until` (epoch seconds), or neither (until resumed)."""

    seconds: float | None = Field(default=None, gt=0.0, le=30 * 86400.0)
    until: float | None = Field(default=None, gt=0.0)
    release: bool = Field(default=True, description="free the weights (false: keep them for a quick resume)")
    grace_seconds: float | None = Field(default=None, ge=0.0, le=3600.0)


class PolicySettingsBody(_Strict):
    """Body of PUT /api/policy (engine/polite/settings.py documents each field); missing: the default."""

    pause_on_fullscreen: bool = True
    exclusive_apps: list[str] = Field(default_factory=list, max_length=200)
    gpu_busy_percent: float | None = 20.0
    cpu_busy_percent: float | None = None
    pause_when_user_active: bool = False
    user_idle_seconds: float = 300.0
    pause_on_battery: bool = True
    max_gpu_temperature: float | None = 85.0
    schedule: list[str] = Field(default_factory=list, max_length=100)
    enter_seconds: float = 3.0
    resume_after_seconds: float = 60.0
    hysteresis_margin: float = 10.0
    hold_seconds: float = 120.0
    grace_seconds: float = 10.0
    max_sessions: int | None = None
    compute_share: float = 1.0


class DetectorReading(BaseModel):
    value: float | None
    detail: str
    unsupported: str | None = Field(description="why this detector cannot work here (null: it works)")
    until: float | None


class PolicyDecision(BaseModel):
    pause: bool
    reason: str | None = None
    message: str | None = None
    until: float | None = None
    release: bool = False
    active: list[str] = Field(default_factory=list)


class PolicyInfo(BaseModel):
    settings: PolicySettingsBody
    detectors: dict[str, DetectorReading]
    decision: PolicyDecision


Status = _from_record(contract.Status)
Stats = _from_record(contract.Stats)


class BlockCoverage(BaseModel):
    index: int
    servers: int
    throughput: float


class ObservedContribution(BaseModel):
    """What this engine's ledger observed of a server (its own view; each peer keeps its own)."""

    credit: float = Field(description="decayed points the server earned with this engine")
    priority: float = Field(description="how soon this engine's servers serve it (1.0 = newcomer)")
    consumed_token_blocks: int = Field(description="work the server did for this engine's client")
    served_token_blocks: int = Field(description="work this engine's servers did for it")
    verified_online_seconds: float
    banned: bool = Field(description="it answered a probe wrongly and is ignored for now")


class SwarmServer(BaseModel):
    peer_id: str
    public_name: str | None
    start_block: int
    end_block: int
    state: contract.ServerState
    throughput: float
    version: str | None
    observed_contribution: ObservedContribution | None = None
    cache_tokens_left: int | None = Field(default=None, description="KV-cache tokens it can still hold")
    quant_type: str | None = None
    torch_dtype: str | None = None
    reachability: Literal["direct", "relayed", "unreachable", "unknown"] = Field(
        default="unknown", description="from the server's own record: dialled directly, via a relay, or not"
    )
    points: float | None = Field(default=None, description="points the server announces (Pollinate servers)")


class SwarmModel(BaseModel):
    """One model of the swarm's index and how much of it is served."""

    dht_prefix: str
    repository: str | None
    num_blocks: int
    covered_blocks: int
    missing_blocks: list[int]
    complete: bool
    servers: int


class SwarmInfo(BaseModel):
    model: str
    dht_prefix: str
    total_blocks: int
    blocks: list[BlockCoverage]
    servers: list[SwarmServer]
    missing_blocks: list[int]
    models: list[SwarmModel] = Field(
        default_factory=list, description="every model in the swarm's index, with its coverage"
    )


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a response model."""
    return model.model_dump(mode="json")
