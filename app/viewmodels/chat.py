"""Chat view model: conversations from ChatHistory, model choices, and one streaming reply at a time."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from app.api_client import ApiClient, ApiError, ApiStream, describe_error
from app.history import ChatHistory, Message
from app.qt import QObject, Signal
from app.sse import SseEvent
from contract import DEFAULT_CONTEXT_TOKENS, ContextFit, ModelFacts


@dataclass(frozen=True)
class ModelChoice:
    """A model the picker offers."""

    id: str
    label: str
    demo: bool  # hosted by the local swarm's demo servers
    missing_blocks: tuple[int, ...] = ()
    context_length: int = DEFAULT_CONTEXT_TOKENS  # prompt + reply, in tokens
    random_weights: bool = False  # a tiny random model: its replies are gibberish

    @property
    def display(self) -> str:
        if self.random_weights:
            return self.label if "random" in self.label.lower() else f"{self.label} (demo, random weights)"
        if self.demo:
            return self.label if "demo" in self.label.lower() else f"{self.label} (local demo swarm)"
        return self.label if self.label == self.id else f"{self.label} ({self.id})"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256


@dataclass(frozen=True)
class ReplyProgress:
    """The reply being streamed: text so far, pieces received, timing."""

    text: str = ""
    pieces: int = 0
    started: float = 0.0
    first_piece: float | None = None
    completion_tokens: int | None = None  # from `usage`, when the engine sends it
    finish_reason: str | None = None
    fit: ContextFit | None = None  # how the engine fitted the request into the context (first chunk)


def model_choices(payload: dict) -> list[ModelChoice]:
    """Parse /v1/models into picker entries: servable models first, random-weight demos last."""
    choices = []
    for entry in payload.get("data") or []:
        facts = ModelFacts.from_dict(entry.get("pollinate"))
        choices.append(
            ModelChoice(
                id=str(entry.get("id")),
                label=str(facts.label or entry.get("id")),
                demo=bool(facts.demo),
                missing_blocks=tuple(facts.missing_blocks or ()),
                context_length=int(facts.context_length or DEFAULT_CONTEXT_TOKENS),
                random_weights=bool(facts.random_weights),
            )
        )
    return sorted(choices, key=lambda c: (c.random_weights, bool(c.missing_blocks)))


# What the transcript adds to a reply that did not finish; for the reader, never sent back to the model.
STOPPED_MARK = "\n\n*(stopped)*"
INTERRUPTED_MARK = "\n\n*(interrupted)*"


def model_text(message: Message) -> str:
    """A message as the model should read it again: without the transcript's marks."""
    text = message.content
    if message.role == "assistant":
        text = text.removesuffix(STOPPED_MARK).removesuffix(INTERRUPTED_MARK)
    return text


def build_request(model: str, system_prompt: str, messages: list[Message], sampling: Sampling) -> dict:
    """The body of POST /v1/chat/completions for a conversation so far.

    The engine fits it into the model's context (`fit_context`): the oldest turns go, the system prompt
    stays, and max_tokens shrinks to what is left; the first chunk says what it did (see `fit_notice`).
    """
    turns = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    turns += [{"role": m.role, "content": model_text(m)} for m in messages if m.role in ("user", "assistant")]
    return {
        "model": model,
        "messages": turns,
        "stream": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "pollinate": {"fit_context": True},
    }


def fit_notice(fit: ContextFit, asked_max_tokens: int) -> str:
    """What a person should know about how the request was fitted into the context ("" when nothing)."""
    notes = []
    if fit.dropped_messages:
        notes.append(
            f"This conversation is longer than the model reads ({fit.context_length} tokens): the "
            f"{fit.dropped_messages} oldest message{'s' if fit.dropped_messages != 1 else ''} "
            "were left out of this reply."
        )
    if fit.max_tokens and fit.max_tokens < asked_max_tokens:
        notes.append(
            f"Max tokens lowered to {fit.max_tokens} so the reply fits the model's context of "
            f"{fit.context_length} tokens."
        )
    return " ".join(notes)


def apply_chunk(progress: ReplyProgress, data: str, now: float) -> ReplyProgress:
    """Fold one SSE `data:` payload (a chat.completion.chunk) into the reply."""
    if data.strip() == "[DONE]":
        return progress
    chunk = json.loads(data)
    delta_text, finish = "", progress.finish_reason
    for choice in chunk.get("choices") or []:
        delta_text += (choice.get("delta") or {}).get("content") or ""
        finish = choice.get("finish_reason") or finish
    usage = chunk.get("usage") or {}
    fit = ContextFit.from_dict(chunk["pollinate"]) if isinstance(chunk.get("pollinate"), dict) else None
    return dataclasses.replace(
        progress,
        fit=fit or progress.fit,
        text=progress.text + delta_text,
        pieces=progress.pieces + (1 if delta_text else 0),
        first_piece=progress.first_piece if progress.first_piece or not delta_text else now,
        completion_tokens=usage.get("completion_tokens", progress.completion_tokens),
        finish_reason=finish,
    )


def tokens_per_second(progress: ReplyProgress, now: float) -> float | None:
    """Generation speed from the first piece on (each piece is about one token)."""
    if progress.first_piece is None:
        return None
    tokens = progress.completion_tokens or progress.pieces
    elapsed = now - progress.first_piece
    if tokens <= 1 or elapsed <= 0:
        return None
    return (tokens - 1) / elapsed


def message_speed(tokens: int | None, seconds: float | None) -> float | None:
    """A saved reply's tokens/s, counted like `tokens_per_second` (from its first token on)."""
    if not tokens or tokens <= 1 or not seconds or seconds <= 0:
        return None
    return (tokens - 1) / seconds


def transcript_markdown(messages: list[Message], streaming: str | None = None) -> str:
    """The conversation as Markdown, one section per turn (QTextDocument renders it)."""
    parts = []
    for message in messages:
        who = {"user": "You", "assistant": "Assistant", "system": "System"}.get(message.role, message.role)
        rate = message_speed(message.tokens, message.seconds) if message.role == "assistant" else None
        speed = f" · {rate:.1f} tokens/s" if rate else ""
        content = message.content or "*(empty)*"
        if message.role == "user":  # typed as plain text: each line stays a line (Markdown would join them)
            content = "  \n".join(content.splitlines())
        parts.append(f"**{who}**{speed}\n\n{content}")
    if streaming is not None:
        parts.append(f"**Assistant** · *writing…*\n\n{streaming or '…'}")
    return "\n\n---\n\n".join(parts)


def _or(value, default):
    return default if value is None else value


class ChatModel(QObject):
    """Conversations and the reply in progress; windows read its attributes after `changed`."""

    changed = Signal()
    models_changed = Signal()
    notice_changed = Signal(str)

    def __init__(self, client: ApiClient, history: ChatHistory, parent: QObject | None = None):
        super().__init__(parent)
        self.client = client
        self.history = history
        self.models: list[ModelChoice] = []
        self.model_id = ""
        self.conversation_id: int | None = None
        self.messages: list[Message] = []
        self.reply: ReplyProgress | None = None
        self.sampling = Sampling()
        self.system_prompt = ""
        self.notice = ""
        self.notice_is_error = False  # errors look like errors; a Stop you chose or a note does not
        self.failed_text: str | None = None  # the message whose reply failed: Retry sends it again
        self.last_speed: float | None = None
        self.engine_ready = False
        self._engine_notice = ""  # the notice set from the engine's state, cleared once it runs
        self._swarm_joined: bool | None = None  # the engine's `ready` (joined the swarm), as last reported
        self.join_problem = ""  # why the engine could not join its swarm (its one sentence), else ""
        self._stream: ApiStream | None = None

    # ---- engine and models

    def set_engine_ready(self, ready: bool, message: str = "") -> None:
        self.engine_ready = ready
        if ready:
            self.refresh_models()
            self._clear_engine_notice()
        else:
            fallback = "The engine is not running; chat will work again when it is back."
            self._engine_notice = message or fallback
            self._set_notice(self._engine_notice, error=True)
        self.changed.emit()

    def on_status(self, status: dict) -> None:
        """An engine status (event or reply): no models while the engine is not in a swarm (joining, perhaps
        another swarm, or could not join); list them again once it has joined."""
        joined = bool(status.get("ready"))
        problem = "" if joined or status.get("state") != "error" else status.get("message") or "?"
        problem_changed, self.join_problem = problem != self.join_problem, problem
        if not joined and (self.models or problem_changed):
            self.models = []
            self.models_changed.emit()
        if self.join_problem and self.engine_ready:
            self._engine_notice = (
                f"Chat needs a swarm, and the engine could not join one. {self.join_problem} "
                "(Retry and Use the local demo are on the dashboard.)"
            )
            self._set_notice(self._engine_notice, error=True)
        elif joined:
            self._clear_engine_notice()
        if joined and self._swarm_joined is False and self.engine_ready:
            self.refresh_models()
        self._swarm_joined = joined

    def can_send(self) -> bool:
        """A message can go out now: the engine runs, has listed the chosen model, and no reply streams."""
        return self.engine_ready and not self.streaming and self.current_model() is not None

    def _clear_engine_notice(self) -> None:
        """The engine's own notice is outdated now; a message that got no reply still waits for Retry."""
        if self.notice and self.notice == self._engine_notice:
            waiting = "Your last message got no reply: Retry sends it again (or edit it and press Enter)."
            self._set_notice(waiting if self.failed_text else "")
        self._engine_notice = ""

    def refresh_models(self) -> None:
        call = self.client.get("/v1/models")
        call.succeeded.connect(self._models_loaded)
        call.failed.connect(self._models_failed)

    def _models_failed(self, error: ApiError) -> None:
        if error.type == "engine_not_ready":  # still joining the swarm: the `ready` status event follows
            if self._swarm_joined:  # ... unless that event already came while this call was answered
                self.refresh_models()
            else:
                self._swarm_joined = False
            return
        if self.engine_ready and not error.unreachable:  # engine down: its own notice says so already
            self._set_notice(describe_error(error, "list the models"), error=True)

    def _models_loaded(self, payload: dict) -> None:
        self.models = model_choices(payload)
        ids = [m.id for m in self.models]
        if self.model_id not in ids:
            self.model_id = ids[0] if ids else ""
        self.models_changed.emit()

    def select_model(self, model_id: str) -> None:
        self.model_id = model_id
        if self.conversation_id is not None:
            self.history.update_conversation(self.conversation_id, model=model_id)
        self.changed.emit()

    def current_model(self) -> ModelChoice | None:
        return next((m for m in self.models if m.id == self.model_id), None)

    # ---- conversations

    def conversations(self):
        return self.history.conversations()

    def open_conversation(self, conversation_id: int) -> None:
        if self.reply is not None:
            self.stop(give_back=False)  # a message without a reply stays where it was asked
        conversation = self.history.conversation(conversation_id)
        if conversation is None:
            return
        self.conversation_id = conversation_id
        self.messages = self.history.messages(conversation_id)
        self.system_prompt = conversation.system_prompt
        if conversation.model:
            self.model_id = conversation.model
        defaults = Sampling()
        self.sampling = Sampling(
            temperature=_or(conversation.temperature, defaults.temperature),
            top_p=_or(conversation.top_p, defaults.top_p),
            max_tokens=_or(conversation.max_tokens, defaults.max_tokens),
        )
        # Notices, a failed message and the speed shown belong to the conversation they came from.
        self.failed_text = None
        replies = [m for m in self.messages if m.role == "assistant"]
        self.last_speed = message_speed(replies[-1].tokens, replies[-1].seconds) if replies else None
        if self.notice != self._engine_notice:
            self._set_notice("")
        self.changed.emit()

    def new_conversation(self) -> int:
        sampling = self.sampling  # a new chat starts with the options last used
        conversation_id = self.history.create_conversation("New chat", self.model_id, self.system_prompt)
        self.history.set_options(conversation_id, sampling.temperature, sampling.top_p, sampling.max_tokens)
        self.open_conversation(conversation_id)
        return conversation_id

    def set_sampling(self, sampling: Sampling) -> None:
        """The conversation's options; saved with it."""
        self.sampling = sampling
        if self.conversation_id is not None:
            self.history.set_options(
                self.conversation_id, sampling.temperature, sampling.top_p, sampling.max_tokens
            )

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self.history.rename(conversation_id, title)
        self.changed.emit()

    def delete_conversation(self, conversation_id: int) -> None:
        if conversation_id == self.conversation_id:
            if self.reply is not None:
                self.stop()
            self.conversation_id, self.messages = None, []
        self.history.delete(conversation_id)
        self.changed.emit()

    def set_system_prompt(self, text: str) -> None:
        self.system_prompt = text
        if self.conversation_id is not None:
            self.history.update_conversation(self.conversation_id, system_prompt=text)

    # ---- one reply at a time

    @property
    def streaming(self) -> bool:
        return self.reply is not None

    def send(self, text: str) -> bool:
        """Add the user's message and stream the reply; False when nothing was sent."""
        text = text.strip()
        if not text or self.streaming:
            return False
        if self.current_model() is None:
            if not self.join_problem:
                self._set_notice("No model to chat with yet: the engine has not listed any.", error=True)
            return False
        if self.conversation_id is None:
            self.new_conversation()
        assert self.conversation_id is not None
        if not self.messages:
            self.history.rename(self.conversation_id, text.splitlines()[0][:48])
        self.history.add_message(self.conversation_id, "user", text)
        self.messages = self.history.messages(self.conversation_id)
        self.failed_text = None
        self._request_reply()
        return True

    def retry(self) -> bool:
        """Send the message whose reply failed again (the window also offers it for editing)."""
        text, self.failed_text = self.failed_text, None
        return self.send(text) if text else False

    def can_regenerate(self) -> bool:
        return not self.streaming and bool(self.messages) and self.messages[-1].role == "assistant"

    def regenerate(self) -> bool:
        """Replace the last reply with a new one for the same conversation."""
        if not self.can_regenerate() or self.current_model() is None:
            return False
        assert self.conversation_id is not None
        self.history.delete_message(self.messages[-1].id)
        self.messages = self.history.messages(self.conversation_id)
        self._request_reply()
        return True

    def _request_reply(self) -> None:
        body = build_request(self.model_id, self.system_prompt, self.messages, self.sampling)
        self.reply = ReplyProgress(started=time.monotonic())
        self._set_notice("")
        stream = self.client.stream("/v1/chat/completions", body)
        self._stream = stream
        stream.event.connect(self._chunk)
        stream.finished.connect(self._finished)
        stream.failed.connect(self._failed)
        self.changed.emit()

    def _chunk(self, event: SseEvent) -> None:
        if self.reply is None:
            return
        had_fit = self.reply.fit is not None
        try:
            self.reply = apply_chunk(self.reply, event.data, time.monotonic())
        except (ValueError, AttributeError, TypeError):
            return
        if not had_fit and self.reply.fit is not None:
            self._set_notice(fit_notice(self.reply.fit, self.sampling.max_tokens))
        self.last_speed = tokens_per_second(self.reply, time.monotonic()) or self.last_speed
        self.changed.emit()

    def _finished(self) -> None:
        self._save_reply(stopped=False)

    def stop(self, give_back: bool = True) -> None:
        """Abort the reply in progress (the engine cancels generation); keep what arrived so far. Before
        the first token, the message goes back to the input (give_back) rather than waiting without a reply
        to be sent again with the next one."""
        if self._stream is not None:
            self._stream.abort()
        if self.reply is not None:
            self._save_reply(stopped=True, give_back=give_back)

    def _save_reply(self, stopped: bool, give_back: bool = True) -> None:
        reply, self.reply, self._stream = self.reply, None, None
        if reply is None or self.conversation_id is None:
            return
        now = time.monotonic()
        tokens = reply.completion_tokens or reply.pieces
        seconds = now - reply.first_piece if reply.first_piece is not None else None
        self.last_speed = tokens_per_second(reply, now) or self.last_speed
        if reply.text or not stopped:
            text = reply.text + (STOPPED_MARK if stopped else "")
            self.history.add_message(self.conversation_id, "assistant", text, tokens, seconds)
            self.messages = self.history.messages(self.conversation_id)
        if stopped and not reply.text and give_back and self._take_back_last_message():
            self._set_notice(
                "Stopped before the reply began: your message is back below, to edit or send again."
            )
        elif stopped:
            self._set_notice("Reply stopped.")
        elif reply.finish_reason == "length":
            limit = reply.fit.max_tokens if reply.fit and reply.fit.max_tokens else self.sampling.max_tokens
            self._set_notice(
                f"The reply reached its limit of {limit} tokens (Max tokens in Options). "
                "Regenerate, or ask it to go on."
            )
        self.changed.emit()

    def _failed(self, error: ApiError) -> None:
        reply, self.reply, self._stream = self.reply, None, None
        if reply is not None and reply.text and self.conversation_id is not None:
            self.history.add_message(self.conversation_id, "assistant", reply.text + INTERRUPTED_MARK)
            self.messages = self.history.messages(self.conversation_id)
        else:
            self._take_back_last_message()
        if error.unreachable:
            self._set_notice(
                "The engine stopped or is restarting: the reply was cut off. Retry when it is back.",
                error=True,
            )
        else:
            self._set_notice(describe_error(error, "get a reply"), error=True)
        self.changed.emit()

    def _take_back_last_message(self) -> bool:
        """No reply at all: take the message back out of the conversation (it would otherwise be sent again,
        silently, with the next one) and offer it to retry or edit. False when the last message is a reply."""
        if not self.messages or self.messages[-1].role != "user" or self.conversation_id is None:
            return False
        self.failed_text = self.messages[-1].content
        self.history.delete_message(self.messages[-1].id)
        self.messages = self.history.messages(self.conversation_id)
        return True

    def _set_notice(self, text: str, error: bool = False) -> None:
        if text != self.notice or error != self.notice_is_error:
            self.notice = text
            self.notice_is_error = error
            self.notice_changed.emit(text)
