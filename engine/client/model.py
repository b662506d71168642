"""A causal LM whose transformer blocks run in the swarm: embeddings, final norm and LM head run here."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.dht import DHT

from engine.client.generation import GenerationStep, generate, stream_generate
from engine.client.inference_session import InferenceSession
from engine.client.remote_sequential import RemoteSequential
from engine.client.sampling import SamplingParams
from engine.client.sequence_manager import ClientConfig, SequenceManager, UsageObserver
from engine.client.speculative import SpeculationConfig, SpeculationStats

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM:
    """Client side of a model served by the swarm (cheap to use after `from_pretrained`; call `close()`)."""

    def __init__(
        self,
        config,
        head,
        manager: SequenceManager,
        *,
        tokenizer_path=None,
        owned_dht: DHT | None = None,
    ):
        self.config = config
        self.head = head
        self.manager = manager
        self.blocks = RemoteSequential(manager)
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._owned_dht = owned_dht
        self._draft_spans: dict[tuple[int, int], Any] = {}  # early-exit blocks by (blocks, max bytes)
        self._feature_drafters: dict[str, Any] = {}  # loaded drafters (factories) by path; "auto": shipped
        self._ngram_tables: dict[str, Any] = {}  # loaded n-gram tables by path; "auto": shipped
        self._tree_calibrations: dict[str, Any] = {}  # draft_tree.Calibration per n-gram table

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        initial_peers: Sequence[str] = (),
        dht: DHT | None = None,
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        token: str | None = None,
        usage_observer: UsageObserver | None = None,
    ) -> DistributedModelForCausalLM:
        """Load the local parts of `model` (hub id or folder) and join the swarm (or use `dht`).

        `usage_observer(peer_id, tokens, blocks, seconds)` hears of each successful reply of a server, e.g.
        `Ledger.record_consumed` to credit the peers whose servers worked for us.
        """
        from engine.models import family_for, load_client_parts, load_config, resolve_checkpoint
        from engine.swarm.dht_node import start_dht

        path = resolve_checkpoint(model, token=token)
        config = load_config(path)
        prefix = dht_prefix or family_for(config).dht_prefix_for(config, str(model))
        head = load_client_parts(path, dtype=dtype, token=token)
        owned = None
        if dht is None:
            dht = owned = start_dht(initial_peers, client_mode=True)
        try:
            manager = SequenceManager(
                dht, prefix, config.num_hidden_layers, client_config, usage_observer=usage_observer
            ).start()
        except BaseException:
            if owned is not None:
                owned.shutdown()
            raise
        return cls(config, head, manager, tokenizer_path=path, owned_dht=owned)

    @property
    def dht_prefix(self) -> str:
        return self.manager.dht_prefix

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from engine.models import load_tokenizer

            if self._tokenizer_path is None:
                raise RuntimeError("this model was built without a checkpoint folder: no tokenizer")
            self._tokenizer = load_tokenizer(self._tokenizer_path)
        return self._tokenizer

    def close(self) -> None:
        """Stop the swarm view; shut our DHT peer down if `from_pretrained` started it."""
        self.manager.close()
        if self._owned_dht is not None:
            self.manager.close_p2p()  # the replica is ours alone when the DHT is
            self._owned_dht.shutdown()
            self._owned_dht = None

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # whole-sequence passes

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for `input_ids` [batch, tokens] (rpc_forward through the swarm)."""
        hidden = self.head.embed(torch.as_tensor(input_ids))
        return self.head.logits(self.blocks(hidden))

    __call__ = forward

    # inference

    def inference_session(self, *, max_length: int) -> InferenceSession:
        """A session whose servers keep KV caches for up to `max_length` tokens; use it with `with`."""
        return InferenceSession(self.manager, max_length=max_length)

    def session_logits(self, session: InferenceSession, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed new tokens to `session`; logits [batch, vocab] for the position after the last one."""
        with torch.no_grad():
            hidden = self.head.embed(input_ids)
            hidden = session.step(hidden)
            return self.head.logits(hidden[:, -1:])[:, -1]

    def session_logits_all(
        self,
        session: InferenceSession,
        input_ids: torch.Tensor,
        *,
        start_from_position: int | None = None,
        last: int | None = None,
        tree_parents: list[int] | None = None,
    ) -> torch.Tensor:
        """Feed new tokens (cutting the caches back to `start_from_position` first); logits at each of the
        `last` positions (all by default; the LM head over a long prompt costs more than its blocks here).
        `tree_parents`: the last tokens form a token tree (InferenceSession.step)."""
        return self.session_forward(
            session, input_ids, start_from_position=start_from_position, last=last, tree_parents=tree_parents
        )[0]

    def session_forward(
        self,
        session: InferenceSession,
        input_ids: torch.Tensor,
        *,
        start_from_position: int | None = None,
        last: int | None = None,
        tree_parents: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`session_logits_all`'s logits, and the last block's outputs (before the final norm) at every new
        position [batch, tokens, hidden]: what a feature drafter drafts from."""
        with torch.no_grad():
            hidden = session.step(
                self.head.embed(input_ids), start_from_position=start_from_position, tree_parents=tree_parents
            )
            return self.head.logits(hidden if last is None else hidden[:, -last:]), hidden

    def can_roll_back(self, session: InferenceSession) -> bool:
        """Whether every server of the session's route cuts its cache itself (speculation pays off there)."""
        return session.can_roll_back

    def can_take_trees(self, session: InferenceSession) -> bool:
        """Whether every server of the route verifies token trees in one step (tree speculation)."""
        return session.can_take_trees

    def accept_tree(self, session: InferenceSession, path: list[int]) -> None:
        """Keep one root-to-node path of the last step's tree (InferenceSession.accept_tree)."""
        session.accept_tree(path)

    def generate_stream(
        self,
        input_ids: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        *,
        session: InferenceSession | None = None,
        attention_mask: torch.Tensor | None = None,
        speculation: SpeculationConfig | None = None,
        stats: SpeculationStats | None = None,
        **sampling: Any,
    ) -> Iterator[GenerationStep]:
        """Yield tokens as the swarm makes them; without `params`, `sampling` fields build SamplingParams.

        `speculation` turns on speculative decoding (batch 1); `stats` counts its rounds and acceptance.
        """
        params = params or self._params(sampling)
        tokenizer = self.tokenizer if params.stop or self._tokenizer_path is not None else None
        speculation = self._with_drafter(speculation)
        return stream_generate(
            self,
            input_ids,
            params,
            session=session,
            tokenizer=tokenizer,
            attention_mask=attention_mask,
            speculation=speculation,
            stats=stats,
        )

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        *,
        session: InferenceSession | None = None,
        attention_mask: torch.Tensor | None = None,
        speculation: SpeculationConfig | None = None,
        stats: SpeculationStats | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Input ids plus generated ids [batch, tokens + new] (see `generate_stream` for the arguments)."""
        params = params or self._params(sampling)
        tokenizer = self.tokenizer if params.stop else None
        speculation = self._with_drafter(speculation)
        return generate(
            self,
            input_ids,
            params,
            session=session,
            tokenizer=tokenizer,
            attention_mask=attention_mask,
            speculation=speculation,
            stats=stats,
        )

    def _with_drafter(self, speculation: SpeculationConfig | None) -> SpeculationConfig | None:
        """`speculation` with a fresh drafter for this generation (drafters keep a cache): what it asks for
        (draft_model, a feature drafter path or factory, draft_blocks when they fit), else the feature
        drafter shipped for this model when there is one (feature_drafter "auto"), else prompt lookup."""
        if speculation is None or speculation.drafter is not None or speculation.draft_model is not None:
            return speculation
        choice = speculation.feature_drafter
        drafter = None
        if choice is not None and choice != "auto":
            drafter = self._feature_drafter(choice)
        elif speculation.draft_blocks > 0:
            span = self.early_exit_blocks(speculation.draft_blocks, speculation.max_draft_bytes)
            if span is not None:  # too big (or the whole model): the next choice drafts instead
                from engine.client.early_exit import EarlyExitDrafter

                drafter = EarlyExitDrafter(self.head, span)
        if drafter is None and choice == "auto":
            drafter = self._feature_drafter("auto")
        if drafter is not None and speculation.tree_rows > 0 and hasattr(drafter, "draft_tree"):
            drafter = self._feature_tree_drafter(drafter, speculation)
        if drafter is None and speculation.ngram_table is not None:
            drafter = self._ngram_drafter(speculation)
        return speculation if drafter is None else dataclasses.replace(speculation, drafter=drafter)

    def _feature_tree_drafter(self, drafter, speculation: SpeculationConfig):
        """A feature drafter's trees (EAGLE-2), with prompt lookup's copies among the candidates when the
        config lets copies stand in for the drafter (lookup_min_match > 0); calibration kept per model."""
        from engine.client.draft_tree import Calibration, FeatureTreeDrafter, NgramTreeDrafter
        from engine.client.speculative import PromptLookupDrafter

        lookup = None
        if speculation.lookup_min_match > 0:
            lookup = NgramTreeDrafter(PromptLookupDrafter(speculation.max_ngram), None, speculation.max_ngram)
        calibration = self._tree_calibrations.setdefault(
            ("feature", str(speculation.feature_drafter)), Calibration()
        )
        return FeatureTreeDrafter(drafter, lookup=lookup, calibration=calibration)

    def _ngram_drafter(self, speculation: SpeculationConfig):
        """A drafter from the n-gram table at the path `speculation.ngram_table`, or ("auto") the one
        shipped for this model; None when there is none (prompt lookup then drafts)."""
        from engine.client.ngram_drafter import NgramDrafter

        choice = str(speculation.ngram_table)
        if choice not in self._ngram_tables:
            self._ngram_tables[choice] = self._load_ngram_table(choice)
        table = self._ngram_tables[choice]
        if table is None:
            return None
        drafter = NgramDrafter(table, speculation.max_ngram, max(speculation.lookup_min_match, 1))
        if speculation.tree_rows > 0:  # trees of the table's and prompt lookup's candidates, where allowed
            from engine.client.draft_tree import Calibration, NgramTreeDrafter

            # What the rounds teach about each kind of candidate holds for the next generations too.
            calibration = self._tree_calibrations.setdefault(choice, Calibration())
            return NgramTreeDrafter(drafter, table, speculation.max_ngram, calibration=calibration)
        return drafter

    def _load_ngram_table(self, choice: str):
        from engine.client.ngram_drafter import NgramTable, NgramTableError, shipped_table_path

        vocab = self.head.lm_head.weight.shape[0]
        if choice != "auto":
            return NgramTable.load(Path(choice), vocab)  # named by the user: its errors say what is wrong
        path = shipped_table_path(*self._model_names())
        try:
            return None if path is None else NgramTable.load(path, vocab)
        except NgramTableError as error:
            logger.info("shipped n-gram table not used: %s", error)
            return None

    def _model_names(self) -> list[str | None]:
        """What this model may be called (checkpoint folder, dht prefix, hub id), for shipped drafters."""
        names = [self.dht_prefix, getattr(self.config, "_name_or_path", None)]
        if self._tokenizer_path is not None:
            names.insert(0, Path(self._tokenizer_path).name)
        return names

    def _feature_drafter(self, choice: Any):
        """A fresh feature drafter: from a factory (`choice` callable), from the drafter folder at a path,
        or ("auto") the one shipped for this model, if any (None otherwise)."""
        if callable(choice):
            return choice()
        key = str(choice)
        if key not in self._feature_drafters:
            self._feature_drafters[key] = self._load_feature_drafter(choice)
        factory = self._feature_drafters[key]
        return None if factory is None else factory()

    def _load_feature_drafter(self, choice: Any):
        from engine.client.feature_drafter import (
            DrafterMismatchError,
            load_feature_drafter,
            shipped_drafter_path,
        )

        if choice != "auto":
            return load_feature_drafter(choice, self.head)  # named by the user: its errors say what is wrong
        folder = shipped_drafter_path(*self._model_names())
        if folder is None:
            return None
        try:
            return load_feature_drafter(folder, self.head)
        except DrafterMismatchError as error:  # same name, other weights (a fine-tune): draft without it
            logger.info("shipped feature drafter %s not used: %s", folder, error)
            return None

    def early_exit_blocks(self, num_blocks: int, max_bytes: int):
        """The model's first `num_blocks` blocks, loaded here once for early-exit drafting; None when they
        are the whole model, exceed `max_bytes`, or there is no checkpoint folder to read them from."""
        key = (num_blocks, max_bytes)
        if key not in self._draft_spans:
            from engine.client.early_exit import load_early_exit_blocks

            span = None
            if self._tokenizer_path is not None:
                span = load_early_exit_blocks(
                    self._tokenizer_path, num_blocks, max_bytes=max_bytes, dtype=self.head.dtype
                )
                if span is None:
                    logger.info("early-exit drafting off: %d blocks exceed %d bytes", num_blocks, max_bytes)
            self._draft_spans[key] = span
        return self._draft_spans[key]

    def _params(self, sampling: dict[str, Any]) -> SamplingParams:
        if "eos_token_id" not in sampling:
            sampling["eos_token_id"] = getattr(self.config, "eos_token_id", None)
        if "pad_token_id" not in sampling:
            sampling["pad_token_id"] = getattr(self.config, "pad_token_id", None)
        if "stop" in sampling and sampling["stop"] is None:
            sampling["stop"] = ()
        return SamplingParams(**sampling)
