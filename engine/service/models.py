"""Models: the catalog of models the engine can name, the swarm's model index, and swarm views.

A part of EngineService (engine/service/engine.py): it shares only the ServiceCore.
"""

from __future__ import annotations

import logging
from typing import Any

from contract import DEFAULT_CONTEXT_TOKENS, ModelFacts
from engine.service.config import (
    SWARM_INDEX_TTL,
    SWARM_MODELS_TTL,
    SWARM_READ_TIMEOUT,
    SWARM_SNAPSHOT_TTL,
    SWARM_STALE_AFTER,
    SWARM_WAIT,
    ModelRef,
)
from engine.service.core import ServiceCore
from engine.service.errors import ModelNotFoundError
from engine.service.swarm_reads import SwarmReads

logger = logging.getLogger(__name__)


def _cached_position_limit(source: str) -> int | None:
    """max_position_embeddings from a checkpoint's config.json on disk (a folder, or the hub cache)."""
    import json
    from pathlib import Path

    path = Path(source).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # not a hub id, or no cache
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


class Catalog:
    """Find models by name, list them (/v1/models) and describe a model's swarm (/api/swarm)."""

    def __init__(self, core: ServiceCore):
        self.core = core
        self._catalog: dict[str, ModelRef] = {}
        # Every DHT read of a request goes through here: one read per key at a time, waits bounded.
        self.reads = SwarmReads(wait=SWARM_WAIT, stale_after=SWARM_STALE_AFTER)
        self._context_lengths: dict[str, int] = {}

    def add(self, ref: ModelRef) -> None:
        """Name a model the engine knows without the swarm's index (the demo model)."""
        with self.core.lock:
            self._catalog[ref.name] = ref

    def _swarm_models(self) -> dict[str, Any]:
        """The swarm's model index (dht_prefix -> ModelInfo), re-read at most every SWARM_INDEX_TTL seconds.

        A failed or late read gives the last index read ({} before the first).
        """
        from engine.swarm.discovery import list_models

        dht = self.core.dht
        if dht is None:
            return {}
        try:
            return self.reads.get(
                "index",
                lambda: list_models(dht, timeout=SWARM_READ_TIMEOUT),
                max_age=SWARM_INDEX_TTL,
                what="the swarm's model index",
            )
        except Exception as exc:
            logger.debug("could not read the swarm's model index: %s", exc)
            return self.reads.peek("index") or {}

    @staticmethod
    def _name_for(dht_prefix: str, repository: str | None) -> str:
        if repository:
            return repository.removeprefix("https://huggingface.co/").strip("/") or dht_prefix
        return dht_prefix

    def find_model(self, name: str | None) -> ModelRef:
        """The model called `name` (None: the default model); raises ModelNotFoundError."""
        from engine.models import family_for, load_config, resolve_checkpoint

        self.core.require_ready()
        name = name or self.core.config.default_model or self._demo_name()
        with self.core.lock:
            for ref in self._catalog.values():
                if name in (ref.name, ref.dht_prefix):
                    return ref
        for prefix, info in self._swarm_models().items():
            # Without a repository (hosted from a private folder) there is no tokenizer to chat with.
            if info.repository and name in (prefix, self._name_for(prefix, info.repository)):
                source = self._name_for(prefix, info.repository)
                ref = ModelRef(source, source, prefix, int(info.num_blocks), source)
                with self.core.lock:
                    return self._catalog.setdefault(ref.name, ref)
        try:
            config = load_config(resolve_checkpoint(name))
            prefix = family_for(config).dht_prefix_for(config, name)
        except Exception as exc:  # hub and network errors come in many types; all mean "cannot use it"
            raise ModelNotFoundError(
                f"Unknown model {name!r}: {exc}. GET /v1/models lists the models the swarm serves."
            ) from exc
        ref = ModelRef(name, name, prefix, int(config.num_hidden_layers), name)
        with self.core.lock:
            return self._catalog.setdefault(ref.name, ref)

    def context_length(self, ref: ModelRef, model_config=None) -> int:
        """Longest prompt + reply (tokens) the engine runs for `ref`: its position limit, capped by config.

        Never goes to the network (listing models must stay fast offline): a hub model's config is read
        only from the local cache, else the default holds until its client (which loads the config) exists.
        """
        with self.core.lock:
            known = self._context_lengths.get(ref.name)
        if model_config is not None:
            known = int(getattr(model_config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_TOKENS)
        elif known is None:
            known = _cached_position_limit(ref.source) or DEFAULT_CONTEXT_TOKENS
        with self.core.lock:
            self._context_lengths[ref.name] = known
        return min(self.core.config.max_context, known)

    def _demo_name(self) -> str:
        if self.core.config.demo_model == "tiny":
            from engine.demo import DEMO_MODEL_NAME

            return DEMO_MODEL_NAME
        from engine.smollm2 import SMOLLM2_MODEL_NAME

        return SMOLLM2_MODEL_NAME

    def snapshot(self, ref: ModelRef, max_age: float = SWARM_SNAPSHOT_TTL):
        """The servers of `ref`'s blocks (a SwarmSnapshot) read less than `max_age` seconds ago; waits at most
        SWARM_WAIT seconds for a read, then SwarmTimeoutError unless a recent read exists."""
        return self.snapshots([ref], errors=False, max_age=max_age)[ref.dht_prefix]

    def snapshots(
        self, refs: list[ModelRef], errors: bool = True, max_age: float = SWARM_SNAPSHOT_TTL
    ) -> dict[str, Any]:
        """Snapshots of several models read in parallel: dht_prefix -> snapshot (with `errors`: or error)."""
        from engine.swarm.discovery import fetch_snapshot

        dht = self.core.dht

        def reader(ref: ModelRef):
            return lambda: fetch_snapshot(dht, ref.dht_prefix, ref.num_blocks, SWARM_READ_TIMEOUT)

        keys = {("snapshot", ref.dht_prefix, ref.num_blocks): ref for ref in refs}
        found = self.reads.get_many(
            {key: reader(ref) for key, ref in keys.items()},
            max_age=max_age,
            what=f"the servers of {', '.join(ref.name for ref in refs)}",
            errors=errors,
        )
        return {ref.dht_prefix: found[key] for key, ref in keys.items()}

    def list_models(self) -> list[dict[str, Any]]:
        """/v1/models: the demo model and every model the swarm can serve fully (one entry per prefix)."""
        self.core.require_ready()
        with self.core.lock:
            by_prefix = {ref.dht_prefix: ref for ref in self._catalog.values()}
        for prefix, info in self._swarm_models().items():
            if info.num_blocks and info.repository and prefix not in by_prefix:
                name = self._name_for(prefix, info.repository)
                by_prefix[prefix] = ModelRef(name, name, prefix, int(info.num_blocks), name)
        entries = []
        refs = sorted(by_prefix.values(), key=lambda r: (not r.demo, r.name))
        snapshots = self.snapshots(refs)  # in parallel, under one deadline
        for ref in refs:
            snapshot = snapshots[ref.dht_prefix]
            if isinstance(snapshot, Exception):
                if not ref.demo:  # a model not known to be fully served is not listed
                    logger.info("leaving %s out of the models: %s", ref.name, snapshot)
                    continue
                missing = []  # the demo's blocks are ours; its entry must not vanish with a slow read
            else:
                missing = snapshot.missing_blocks()
            if ref.demo or not missing:
                facts = ModelFacts(
                    label=ref.label,
                    demo=ref.demo,
                    random_weights=ref.random_weights,
                    num_blocks=ref.num_blocks,
                    missing_blocks=missing,
                    context_length=self.context_length(ref),
                ).to_dict()
                entries.append(dict(id=ref.name, created=0, owned_by="pollinate-swarm", pollinate=facts))
        return entries

    def _observed(self, peer_id: str) -> dict[str, Any] | None:
        """What our ledger saw of a server: its credit with us (None: never met)."""
        seen = self.core.ledger.contribution(peer_id) if self.core.ledger is not None else None
        if seen is None:
            return None
        return dict(
            credit=float(seen.credit),
            priority=float(seen.priority),
            consumed_token_blocks=int(seen.consumed_token_blocks),
            served_token_blocks=int(seen.served_token_blocks),
            verified_online_seconds=float(seen.verified_online_seconds),
            banned=bool(seen.banned),
        )

    def swarm_info(self, model: str | None) -> dict[str, Any]:
        """/api/swarm: block coverage and servers of one model, and the coverage of every indexed model."""
        from engine.swarm.health import model_health
        from engine.swarm.records import ServerState

        ref = self.find_model(model)
        self._start_coverage_read()  # in parallel with the model's own read
        snapshot = self.snapshot(ref)
        coverage = snapshot.coverage()
        throughputs = snapshot.block_throughputs(ServerState.ONLINE)
        servers = []
        for row in model_health(snapshot).servers:
            server = row.to_dict()
            server.pop("inference_rps")
            server["observed_contribution"] = self._observed(row.peer_id)
            servers.append(server)
        return dict(
            model=ref.name,
            dht_prefix=ref.dht_prefix,
            total_blocks=ref.num_blocks,
            blocks=[
                dict(index=i, servers=coverage[i], throughput=float(throughputs[i]))
                for i in range(ref.num_blocks)
            ],
            servers=servers,
            missing_blocks=snapshot.missing_blocks(),
            models=self._swarm_models_coverage(),
        )

    def _start_coverage_read(self) -> None:
        self.reads.start("coverage", self._read_coverage, SWARM_MODELS_TTL)

    def _swarm_models_coverage(self) -> list[dict[str, Any]]:
        """Coverage of each model in the index, re-read at most every SWARM_MODELS_TTL seconds.

        The read (one per model) runs in the background: a request waits for it only when there is no
        earlier one, and gets [] when the swarm is too slow for that.
        """
        earlier = self.reads.peek("coverage")
        try:
            return self.reads.get(
                "coverage",
                self._read_coverage,
                max_age=SWARM_MODELS_TTL,
                what="the coverage of the swarm's models",
                wait=0.0 if earlier is not None else None,
                stale_after=float("inf"),
            )
        except Exception as exc:
            logger.warning("could not read the coverage of the swarm's models: %s", exc)
            return earlier or []

    def _read_coverage(self) -> list[dict[str, Any]]:
        from engine.swarm.discovery import fetch_snapshot
        from engine.swarm.health import read_swarm_health

        dht = self.core.dht
        view = read_swarm_health(
            self._swarm_models(), lambda prefix, n: fetch_snapshot(dht, prefix, n, SWARM_READ_TIMEOUT)
        )
        return [
            dict(
                dht_prefix=m.dht_prefix,
                repository=m.repository,
                num_blocks=m.num_blocks,
                covered_blocks=m.covered_blocks,
                missing_blocks=m.missing_blocks,
                complete=m.complete,
                servers=sum(s.state == "online" for s in m.servers),
            )
            for m in view
        ]
