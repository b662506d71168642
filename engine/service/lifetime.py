"""Lifetime counters: what this computer served over every run of the engine (like BOINC's total credit).

The file in the data dir holds the totals of earlier runs; a run adds its own counters to them and writes
the sum back (atomically) as it goes, so a crash loses at most the last few seconds, and totals never
decrease across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from contract import LIFETIME_STATS_FILE

logger = logging.getLogger(__name__)

FIELDS = ("tokens_served", "requests_served", "hosting_seconds")


class LifetimeCounters:
    """Totals of earlier runs (read once) plus this run's counters; `save()` writes the sum."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LIFETIME_STATS_FILE
        self._lock = threading.Lock()
        self._earlier = dict.fromkeys(FIELDS, 0.0)
        self._saved: dict[str, float] | None = None
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            for name in FIELDS:
                self._earlier[name] = max(0.0, float(raw.get(name) or 0.0))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Unreadable totals must not stop the engine; start again from zero and say so.
            logger.warning("lifetime counters in %s are unreadable (%s); starting from zero", self.path, exc)

    def totals(self, run: dict[str, float]) -> dict[str, float]:
        """Earlier runs plus `run` (this run's counters, keyed by FIELDS)."""
        return {name: self._earlier[name] + max(0.0, float(run.get(name) or 0.0)) for name in FIELDS}

    def save(self, run: dict[str, float]) -> None:
        """Write the totals when they changed (temp file + rename: readers never see half a file)."""
        totals = self.totals(run)
        with self._lock:
            if self._saved is not None:  # totals only grow, whatever a caller passes
                totals = {name: max(totals[name], self._saved[name]) for name in FIELDS}
            if totals == self._saved:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temp = self.path.with_suffix(".tmp")
                temp.write_text(json.dumps(totals), encoding="utf-8")
                os.replace(temp, self.path)
                self._saved = totals
            except OSError as exc:
                logger.warning("could not save lifetime counters to %s: %s", self.path, exc)
