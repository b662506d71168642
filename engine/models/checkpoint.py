"""Finding a checkpoint (local folder or Hugging Face hub id) and reading only the tensors we need from it.

A hub id resolves to a snapshot folder in huggingface_hub's cache holding config, tokenizer and the
safetensors index; weight shards are fetched one by one when a reader first needs them, so a server
hosting 10 of 80 blocks downloads only the shards those blocks live in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import envs
from engine.models.errors import CheckpointError, ModelError, ModelNotFoundError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Everything but the weight shards: enough to read the config, tokenize, and plan which shards to fetch.
METADATA_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",  # sentencepiece vocabularies
    "chat_template*",
    INDEX_FILE,
    "pollinate_tiny.json",
]


def resolve_checkpoint(
    model: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return the local folder of a checkpoint: a local folder as is, a hub id via huggingface_hub's cache.

    Only metadata (config, tokenizer, safetensors index) is downloaded here; shards come later, on demand.
    With HF_HUB_OFFLINE=1 the id must already be in the cache. `cache_dir` overrides the hub cache location.
    """
    text = str(model).strip()
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local} is a folder but has no config.json: not a Hugging Face checkpoint"
            )
        return local.resolve()
    if _looks_like_path(text):
        raise ModelNotFoundError(f"model folder {text!r} does not exist")
    return _resolve_hub_id(text, revision=revision, token=token, cache_dir=cache_dir)


def _looks_like_path(text: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that names a filesystem location is a path.
    return text.startswith(("/", ".", "~", "\\")) or text.count("/") > 1 or (len(text) > 1 and text[1] == ":")


def _resolve_hub_id(repo_id: str, *, revision: str | None, token: str | None, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = envs.hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token or envs.hf_token(),
            cache_dir=cache_dir,
            allow_patterns=METADATA_PATTERNS,
            local_files_only=offline,
        )
    except HFValidationError as error:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hugging Face model id (owner/name)"
        ) from error
    except GatedRepoError as error:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on huggingface.co and set a Hugging Face token"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(
            f"no model {repo_id!r} on the Hugging Face hub (check the spelling; private models need a token)"
        ) from error
    except RevisionNotFoundError as error:
        raise ModelNotFoundError(f"model {repo_id} has no revision {revision!r}") from error
    except LocalEntryNotFoundError as error:
        hint = (
            "HF_HUB_OFFLINE is set: download it once while online, or unset HF_HUB_OFFLINE"
            if offline
            else "the hub could not be reached: check the network connection"
        )
        raise ModelNotFoundError(f"model {repo_id} is not in the local Hugging Face cache; {hint}") from error
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"model {repo_id} has no config.json: not a transformers checkpoint")
    return folder


def load_config(path: str | Path):
    """The transformers config of a checkpoint folder (see resolve_checkpoint for hub ids)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json")
    return AutoConfig.from_pretrained(path)


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (AutoTokenizer), loaded from its folder without any network access."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
        _require_sentencepiece(path)
    return AutoTokenizer.from_pretrained(path)


def _require_sentencepiece(path: Path) -> None:
    # Older folders (Llama 2, anything saved by transformers <= 4.34) hold only a sentencepiece
    # tokenizer.model; without the library transformers fails with a misleading "tiktoken" message.
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ModelError(
            f"{path} has only a sentencepiece tokenizer (tokenizer.model); "
            "install it with: pip install sentencepiece"
        ) from None


@dataclass
class LoadStats:
    """What a reader actually read: proof (and telemetry) that loading a span touches only its own tensors."""

    tensors_in_checkpoint: int = 0
    tensors_read: int = 0
    bytes_read: int = 0
    shards_opened: set[str] = field(default_factory=set)


class CheckpointReader:
    """Reads named tensors from a (sharded) safetensors checkpoint, opening only the shards that hold them."""

    def __init__(self, path: str | Path, *, token: str | None = None):
        self.path = Path(path)
        self._token = token
        self._weight_map = self._read_weight_map()
        self.stats = LoadStats(tensors_in_checkpoint=len(self._weight_map))

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        single = self.path / SINGLE_FILE
        if single.is_file() or _hub_snapshot(self.path) is not None:
            shard = self._shard_path(SINGLE_FILE)
            from safetensors import safe_open

            with safe_open(shard, framework="pt") as handle:
                return dict.fromkeys(handle.keys(), SINGLE_FILE)
        raise CheckpointError(
            f"{self.path} has no {INDEX_FILE} or {SINGLE_FILE}: only safetensors checkpoints are supported"
        )

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint (from the index; reads no tensor data)."""
        return list(self._weight_map)

    def has(self, key: str) -> bool:
        """Whether the checkpoint holds a tensor of this name."""
        return key in self._weight_map

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Tensor names that start with `prefix` (e.g. one block's "model.layers.7.")."""
        return [key for key in self._weight_map if key.startswith(prefix)]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly these tensors (on CPU, stored dtype), opening each needed shard once."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for key in keys:
            if key not in self._weight_map:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint at {self.path}")
            by_shard.setdefault(self._weight_map[key], []).append(key)
        tensors = {}
        for shard, shard_keys in by_shard.items():
            with safe_open(self._shard_path(shard), framework="pt", device="cpu") as handle:
                for key in shard_keys:
                    tensor = handle.get_tensor(key)
                    tensors[key] = tensor
                    self.stats.tensors_read += 1
                    self.stats.bytes_read += tensor.numel() * tensor.element_size()
            self.stats.shards_opened.add(shard)
        return tensors

    def _shard_path(self, shard: str) -> Path:
        local = self.path / shard
        if local.is_file():
            return local
        snapshot = _hub_snapshot(self.path)
        if snapshot is None:
            raise CheckpointError(f"shard {shard} listed in the index is missing from {self.path}")
        return _download_shard(*snapshot, shard, token=self._token)


def _hub_snapshot(path: Path) -> tuple[Path, str, str] | None:
    """(cache_dir, repo_id, commit) when `path` is a snapshot folder in huggingface_hub's cache layout."""
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    repo_id = path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.parent.parent.parent, repo_id, path.name


def _download_shard(cache_dir: Path, repo_id: str, commit: str, shard: str, *, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    logger.info("Fetching %s from %s (only the shards of the hosted blocks are downloaded)", shard, repo_id)
    try:
        return Path(
            hf_hub_download(
                repo_id,
                shard,
                revision=commit,
                cache_dir=cache_dir,
                token=token or envs.hf_token(),
                local_files_only=envs.hub_offline(),
            )
        )
    except LocalEntryNotFoundError as error:
        raise ModelNotFoundError(
            f"shard {shard} of {repo_id} is not in the local Hugging Face cache and the hub is unreachable "
            "or HF_HUB_OFFLINE is set"
        ) from error
