"""Where the app keeps its files: platformdirs locations, overridable by POLLINATE_DATA_DIR / _CONFIG_DIR."""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_NAME = "pollinate"


def data_dir() -> Path:
    """User data directory (chat history, engine state, logs); shared with the engine; made on demand."""
    from platformdirs import user_data_path

    path = Path(os.environ.get("POLLINATE_DATA_DIR") or user_data_path(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    """User config directory (settings.json); created on demand."""
    from platformdirs import user_config_path

    path = Path(os.environ.get("POLLINATE_CONFIG_DIR") or user_config_path(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """User cache directory (the engine's caches; model weights live in the Hugging Face cache)."""
    from platformdirs import user_cache_path

    return Path(os.environ.get("POLLINATE_CACHE_DIR") or user_cache_path(APP_NAME, appauthor=False))


def huggingface_cache_dir() -> Path:
    """Where Hugging Face keeps downloaded weights (HF_HUB_CACHE, HF_HOME or ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resource_path(name: str) -> Path:
    """A file shipped in app/resources (icons)."""
    return Path(__file__).with_name("resources") / name


ENGINE_VENV = "engine-venv"  # where installers put the engine's virtual environment


def engine_python() -> Path | None:
    """The Python that runs the engine (`-m engine.cli`) as a local process; None when there is none.

    POLLINATE_ENGINE_PYTHON if set; from source, this interpreter; in a frozen bundle (which holds no engine),
    the `engine-venv` an installer made beside the bundle or in the user data directory.
    """
    if os.environ.get("POLLINATE_ENGINE_PYTHON"):
        return Path(os.environ["POLLINATE_ENGINE_PYTHON"])
    if not getattr(sys, "frozen", False):
        return Path(sys.executable)
    from platformdirs import user_data_path

    relative = Path("Scripts", "python.exe") if sys.platform == "win32" else Path("bin", "python")
    bundle = Path(sys.executable).resolve().parent
    for root in (bundle.parent, bundle, user_data_path(APP_NAME, appauthor=False)):
        if (root / ENGINE_VENV / relative).exists():
            return root / ENGINE_VENV / relative
    return None
