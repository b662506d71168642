"""Generation: completions through the swarm client, streamed as Started / TextDelta / Finished events.

A part of EngineService (engine/service/engine.py): it uses the ServiceCore and the Catalog.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

from engine.service.config import ModelRef
from engine.service.core import ServiceCore
from engine.service.errors import InvalidRequestError, unavailable
from engine.service.models import Catalog
from engine.service.text import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    IncrementalDecoder,
    Started,
    TextDelta,
    TextHoldback,
    eos_ids,
)


class Generation:
    """Swarm clients (one per model), `generate()`, and what this engine generated for its API clients."""

    def __init__(self, core: ServiceCore, catalog: Catalog):
        self.core = core
        self.catalog = catalog
        self._clients: dict[str, Any] = {}
        self._client_locks: dict[str, threading.Lock] = {}
        self._generated = {"tokens": 0, "requests": 0}
        self._sessions = 0

    def counters(self) -> dict[str, int]:
        """Tokens and completions generated since the engine started."""
        with self.core.lock:
            return dict(self._generated)

    def take_clients(self) -> list:
        """The swarm clients, handed over for closing (the engine is stopping)."""
        with self.core.lock:
            clients, self._clients = list(self._clients.values()), {}
        return clients

    def _client(self, ref: ModelRef):
        """The swarm client of `ref` (embeddings, head, tokenizer, swarm view), made once per model."""
        from engine.client.model import DistributedModelForCausalLM

        with self.core.lock:
            lock = self._client_locks.setdefault(ref.name, threading.Lock())
        with lock:
            with self.core.lock:
                client = self._clients.get(ref.name)
            if client is None:
                observer = self.core.ledger.record_consumed if self.core.ledger is not None else None
                client = DistributedModelForCausalLM.from_pretrained(
                    ref.source, dht=self.core.dht, dht_prefix=ref.dht_prefix, usage_observer=observer
                )
                with self.core.lock:
                    self._clients[ref.name] = client
            return client

    def _prompt_ids(self, tokenizer, request: GenerationRequest) -> list[int]:
        if request.messages is None:
            return list(tokenizer(request.prompt)["input_ids"])
        messages = [{"role": role, "content": content} for role, content in request.messages]
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # templates may reject role orders (e.g. two user turns in a row)
                raise InvalidRequestError(
                    f"The model's chat template rejected these messages: {exc}"
                ) from exc
        else:  # a base model without a template: a plain transcript that ends where the reply begins
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        # The template already holds any special tokens the model expects (such as BOS).
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fitted_prompt(self, tokenizer, request: GenerationRequest, context: int) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out to fit `context`.

        With `fit_context`, turns are dropped oldest first (the system prompt and the last message stay;
        the kept turns start with a user turn, as chat templates expect) until the prompt leaves room for
        the reply: `max_tokens`, but at most a quarter of the context, so a long answer asked for does not
        wipe out the conversation.
        """
        ids = self._prompt_ids(tokenizer, request)
        if not request.fit_context or request.messages is None:
            return ids, 0
        reserve = min(request.max_tokens or context // 4, context // 4)
        system = [m for m in request.messages if m[0] in ("system", "developer")]
        turns = [m for m in request.messages if m[0] not in ("system", "developer")]
        dropped = 0
        while len(ids) + reserve > context and len(turns) > 1:
            turns.pop(0)
            dropped += 1
            while len(turns) > 1 and turns[0][0] != "user":
                turns.pop(0)
                dropped += 1
            fitted = dataclasses.replace(request, messages=(*system, *turns))
            ids = self._prompt_ids(tokenizer, fitted)
        return ids, dropped

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[GenerationEvent]:
        """Run one completion through the swarm; yields Started, TextDeltas, then Finished.

        Blocking (run it in a worker thread). Closing the iterator, or setting `cancel`, ends the inference
        session, so the servers free its cache.
        """
        import torch

        from engine.client.routing import MissingBlocksError
        from engine.client.sampling import SamplingParams
        from engine.client.speculative import SpeculationConfig, SpeculationStats

        ref = self.catalog.find_model(request.model)
        # Read now, not reused: a server (ours, say) may have come online a moment ago.
        missing = self.catalog.snapshot(ref, max_age=0.0).missing_blocks()
        if missing:
            raise unavailable(ref.name, missing)
        client = self._client(ref)
        tokenizer = client.tokenizer
        context = self.catalog.context_length(ref, client.config)
        ids, dropped = self._fitted_prompt(tokenizer, request, context)
        if len(ids) >= context:
            raise InvalidRequestError(
                f"The prompt has {len(ids)} tokens; {ref.name} reads at most {context} tokens (prompt and "
                "reply together): shorten it, or start a new conversation."
            )
        max_new = request.max_tokens or context - len(ids)
        if request.fit_context:
            max_new = min(max_new, context - len(ids))
        if len(ids) + max_new > context:
            raise InvalidRequestError(
                f"The prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds the context of "
                f"{context} tokens; ask for at most {context - len(ids)} new tokens."
            )
        params = SamplingParams(
            max_new_tokens=max_new,
            do_sample=request.temperature > 0,
            temperature=request.temperature if request.temperature > 0 else 1.0,
            top_p=request.top_p if request.top_p is not None and request.top_p < 1.0 else None,
            seed=request.seed,
            eos_token_id=eos_ids(client.config, tokenizer),
            pad_token_id=getattr(client.config, "pad_token_id", None),
        )
        text = TextHoldback(request.stop)
        decoder = IncrementalDecoder(tokenizer)
        new_ids: list[int] = []
        produced, reason = 0, "length"
        stats = SpeculationStats()
        config = self.core.config
        speculation = None
        if config.speculation:
            feature = None if config.feature_drafter == "off" else config.feature_drafter
            speculation = SpeculationConfig(draft_blocks=config.draft_blocks, feature_drafter=feature)
        began = time.perf_counter()
        token_times: list[float] = []
        with self.core.lock:
            self._sessions += 1
        try:
            with client.inference_session(max_length=len(ids) + max_new) as session:
                steps = client.generate_stream(
                    torch.tensor([ids]), params, session=session, speculation=speculation, stats=stats
                )
                try:
                    started = False
                    for step in steps:
                        if not started:  # the prefill went through: from here on errors are in-band
                            started = True
                            yield Started(len(ids), context, max_new, dropped)
                        produced += 1
                        token_times.append(time.perf_counter())
                        token = int(step.tokens[0])
                        if token in params.eos_ids:
                            reason = "stop"
                            break
                        new_ids.append(token)
                        delta, stopped = text.feed(decoder.step(new_ids))
                        if delta:
                            yield TextDelta(delta)
                        if stopped:
                            reason = "stop"
                            break
                        if cancel.is_set():
                            return
                    if not started:
                        yield Started(len(ids), context, max_new, dropped)
                finally:
                    steps.close()
            tail = text.feed(decoder.finish(new_ids))[0] + text.flush()
            if tail:
                yield TextDelta(tail)
            with self.core.lock:
                self._generated["tokens"] += produced
                self._generated["requests"] += 1
            yield Finished(
                reason, len(ids), produced, timings(began, token_times, stats if speculation else None)
            )
        except MissingBlocksError as exc:
            raise unavailable(ref.name, exc.missing_blocks) from exc
        finally:
            with self.core.lock:
                self._sessions -= 1


def timings(began: float, token_times: list[float], stats) -> dict:
    """Speed figures of one completion, in the names llama.cpp's server uses, plus speculation counters.

    prompt_ms: request start to the first new token (the prefill, through the swarm); predicted_ms: the
    tokens after it; predicted_per_second: their rate (None with fewer than two tokens).
    """
    result: dict = {"prompt_ms": None, "predicted_n": len(token_times), "predicted_ms": None}
    result["predicted_per_second"] = None
    if token_times:
        result["prompt_ms"] = round((token_times[0] - began) * 1e3, 1)
        decode = token_times[-1] - token_times[0]
        result["predicted_ms"] = round(decode * 1e3, 1)
        if len(token_times) > 1 and decode > 0:
            result["predicted_per_second"] = round((len(token_times) - 1) / decode, 2)
    if stats is not None:
        speculation = stats.as_dict()
        for key in ("acceptance", "tokens_per_round"):
            if speculation[key] is not None:
                speculation[key] = round(speculation[key], 3)
        result["speculation"] = speculation
    return result
