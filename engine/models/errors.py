"""Errors of the models package: one base class, so callers can catch "the model is unusable" at once."""

from __future__ import annotations


class ModelError(Exception):
    """Base class for every error about a model, its checkpoint, or running its blocks."""


class ModelNotFoundError(ModelError):
    """The model id or folder does not name a usable checkpoint (missing, misspelt, gated, or not cached)."""


class UnsupportedModelError(ModelError):
    """The checkpoint's architecture (config.model_type) has no adapter here."""


class CheckpointError(ModelError):
    """The checkpoint exists but is malformed: missing tensors, no safetensors, inconsistent index."""


class CacheOverflowError(ModelError):
    """An inference step would write past the KV cache's max_length."""
