"""Lifetime counters survive engine restarts and never go backwards."""

from __future__ import annotations

import json

from contract import LIFETIME_STATS_FILE
from engine.service.lifetime import LifetimeCounters


def test_totals_add_up_over_runs(tmp_path):
    first = LifetimeCounters(tmp_path)
    first.save({"tokens_served": 100, "requests_served": 3, "hosting_seconds": 29.0})
    second = LifetimeCounters(tmp_path)  # the engine restarted: this run's counters start at zero
    assert second.totals({}) == {"tokens_served": 100, "requests_served": 3, "hosting_seconds": 29.0}
    second.save({"tokens_served": 5, "requests_served": 1, "hosting_seconds": 17.0})
    saved = json.loads((tmp_path / LIFETIME_STATS_FILE).read_text())
    assert saved == {"tokens_served": 105, "requests_served": 4, "hosting_seconds": 46.0}


def test_saved_totals_never_decrease(tmp_path):
    counters = LifetimeCounters(tmp_path)
    counters.save({"tokens_served": 50, "hosting_seconds": 10.0})
    counters.save({"tokens_served": 20, "hosting_seconds": 4.0})  # e.g. a host dropped at shutdown
    saved = json.loads((tmp_path / LIFETIME_STATS_FILE).read_text())
    assert saved["tokens_served"] == 50 and saved["hosting_seconds"] == 10.0


def test_unreadable_file_starts_from_zero(tmp_path, caplog):
    (tmp_path / LIFETIME_STATS_FILE).write_text("{not json")
    counters = LifetimeCounters(tmp_path)
    assert counters.totals({"tokens_served": 7})["tokens_served"] == 7
    assert "unreadable" in caplog.text
