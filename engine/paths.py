"""Where the engine keeps its files: platformdirs locations, overridable through engine.envs."""

from __future__ import annotations

from pathlib import Path

from engine import envs

APP_NAME = "pollinate"


def data_dir() -> Path:
    """User data directory (ledger, demo model, engine state); created on demand."""
    from platformdirs import user_data_path

    path = Path(envs.data_dir_override() or user_data_path(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """User cache directory (throughput measurements); created on demand."""
    from platformdirs import user_cache_path

    path = Path(envs.cache_dir_override() or user_cache_path(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path
