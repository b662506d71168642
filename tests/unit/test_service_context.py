"""The context length /v1/models reports is read from disk only: listing models never waits on the network."""

from __future__ import annotations

import json
import time

from engine.service.models import _cached_position_limit


def test_position_limit_from_a_folder_and_never_from_the_network(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    assert _cached_position_limit(str(tmp_path)) == 512
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    began = time.monotonic()
    assert _cached_position_limit("some-owner/not-downloaded-model") is None
    assert time.monotonic() - began < 2.0
