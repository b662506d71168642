"""The app ⇄ engine contract: records read back what they write, the API schema follows them, phases order."""

from __future__ import annotations

import dataclasses

import pytest

import contract
from contract import HostingPlan, HostingState, LoadPhase, ModelFacts, Stats, Status, hosting_progress


@pytest.mark.parametrize("record", [Status, Stats, HostingPlan, ModelFacts])
def test_records_round_trip_and_ignore_unknown_keys(record):
    full = record().to_dict()
    assert record.from_dict({**full, "added_by_a_newer_engine": 1}).to_dict() == full
    assert record.from_dict({}) == record()
    assert all(contract.field_docs(record).values()), "every field says what it is"


def test_status_reads_enums_and_keeps_unknown_states():
    status = Status.from_dict({"state": "loading", "phase": "loading_blocks", "blocks": [2, 6]})
    assert status.state is HostingState.LOADING and status.phase is LoadPhase.LOADING_BLOCKS
    assert status.to_dict()["state"] == "loading" and status.to_dict()["blocks"] == [2, 6]
    # An engine of a later version may report a state this app does not know: keep it, do not crash.
    assert Status.from_dict({"state": "paused"}).to_dict()["state"] == "paused"


def test_hosting_progress_grows_through_the_phases():
    points = [hosting_progress(phase, f) for phase in LoadPhase for f in (0.0, 0.5, 1.0)]
    assert points == sorted(points) and points[0] == 0.0 and points[-1] == 1.0
    assert hosting_progress(LoadPhase.LOADING_BLOCKS, 2.0) == hosting_progress(LoadPhase.MEASURING)
    assert all(phase.words for phase in LoadPhase)


@pytest.mark.parametrize(
    ("schema", "record"),
    [("Status", Status), ("Stats", Stats), ("HostingPlan", HostingPlan), ("PollinateModelFacts", ModelFacts)],
)
def test_api_schema_is_the_contract(schema, record):
    from engine.api import schemas

    model = getattr(schemas, schema)
    assert list(model.model_fields) == [f.name for f in dataclasses.fields(record)]
    # A full record validates as an answer, and the answer is the record again.
    assert model.model_validate(record().to_dict()).model_dump(mode="json") == record().to_dict()
