"""Records: exact Petals 2.x wire shape, round trips, and strict validation of what peers send."""

import math

import pytest
from hivemind.utils.serializer import MSGPackSerializer

from engine.swarm.records import (
    MAX_TEXT_LENGTH,
    PETALS_EXTRA_FIELDS,
    InvalidRecordError,
    ModelInfo,
    RemoteSpanInfo,
    ServerInfo,
    ServerState,
)

PEER = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"


def full_info(**changes) -> ServerInfo:
    fields = dict(
        state=ServerState.ONLINE,
        throughput=12.5,
        start_block=3,
        end_block=7,
        public_name="alice",
        version="2.2.0",
        network_rps=100.0,
        forward_rps=5.5,
        inference_rps=3.0,
        adapters=("owner/lora",),
        torch_dtype="float16",
        quant_type="nf4",
        using_relay=False,
        cache_tokens_left=4096,
        next_pings={PEER: 0.02, "QmOther": math.inf},
    )
    fields.update(changes)
    return ServerInfo(**fields)


def wire(value):
    """What a peer receives: the value after hivemind's msgpack round trip."""
    return MSGPackSerializer.loads(MSGPackSerializer.dumps(value))


def test_to_tuple_is_exactly_petals_shape():
    state, throughput, extra = full_info().to_tuple()
    assert (state, throughput) == (2, 12.5)
    assert type(state) is int and type(throughput) is float
    assert list(extra) == list(PETALS_EXTRA_FIELDS)  # every Petals field, in Petals' order, no extensions
    assert extra["adapters"] == ("owner/lora",) and extra["next_pings"] == {PEER: 0.02, "QmOther": math.inf}


def test_minimal_record_has_all_petals_keys_as_none():
    value = ServerInfo(ServerState.JOINING, 0.0).to_tuple()
    assert value[:2] == (1, 0.0)
    assert value[2] == {**dict.fromkeys(PETALS_EXTRA_FIELDS), "adapters": ()}


def test_numbers_are_sent_with_petals_strict_types():
    # Petals' pydantic fields are strict: an int where a float belongs would make it drop our record.
    info = ServerInfo(2, 3, network_rps=1, forward_rps=2, inference_rps=4, next_pings={PEER: 1}, points=5)
    _, throughput, extra = info.to_tuple()
    assert type(throughput) is float
    assert all(type(extra[name]) is float for name in ("network_rps", "forward_rps", "inference_rps"))
    assert type(extra["next_pings"][PEER]) is float and type(extra["points"]) is float
    assert type(info.state) is ServerState


def test_round_trip_through_msgpack():
    info = full_info(pollinate_protocol=1, points=7.0)
    sent = wire(info.to_tuple())
    assert isinstance(sent, tuple)  # hivemind keeps tuples as tuples
    assert ServerInfo.from_tuple(sent) == info


def test_extensions_go_in_extra_only_when_set():
    extra = full_info(pollinate_protocol=1, points=2.5).to_tuple()[2]
    assert extra["pollinate_protocol"] == 1 and extra["points"] == 2.5


def test_petals_records_parse():
    # Petals 2.2 sends no start_block/end_block; a record may also lack the extra dict entirely.
    petals_22 = (2, 830.5, {"public_name": None, "version": "2.2.0", "adapters": [], "next_pings": None})
    info = ServerInfo.from_tuple(wire(petals_22))
    assert info.state is ServerState.ONLINE and info.start_block is None and info.adapters == ()
    assert ServerInfo.from_tuple((0, 1.0)).state is ServerState.OFFLINE


def test_unknown_extra_keys_and_trailing_items_are_ignored():
    info = ServerInfo.from_tuple((2, 1.0, {"future_field": [1, 2], "cache_tokens_left": 5}, "more"))
    assert info.cache_tokens_left == 5


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "2,1.0",
        {"state": 2, "throughput": 1.0},
        b"\x02",
        (2,),
        (),
        (2.0, 1.0, {}),  # float state
        (True, 1.0, {}),  # bool state
        (3, 1.0, {}),  # unknown state
        (-1, 1.0, {}),
        ("2", 1.0, {}),
        (2, -1.0, {}),  # negative throughput
        (2, math.nan, {}),
        (2, math.inf, {}),
        (2, "1.0", {}),
        (2, True, {}),
        (2, 1.0, []),  # extra is not a dict
        (2, 1.0, {"start_block": -1}),
        (2, 1.0, {"start_block": 1.0}),
        (2, 1.0, {"start_block": 5, "end_block": 5}),
        (2, 1.0, {"cache_tokens_left": -3}),
        (2, 1.0, {"cache_tokens_left": True}),
        (2, 1.0, {"public_name": 5}),
        (2, 1.0, {"public_name": "x" * (MAX_TEXT_LENGTH + 1)}),
        (2, 1.0, {"version": b"2.2"}),
        (2, 1.0, {"adapters": None}),
        (2, 1.0, {"adapters": "lora"}),
        (2, 1.0, {"adapters": [1]}),
        (2, 1.0, {"adapters": ["a"] * 10_000}),
        (2, 1.0, {"using_relay": 1}),
        (2, 1.0, {"inference_rps": -0.5}),
        (2, 1.0, {"network_rps": [1.0]}),
        (2, 1.0, {"next_pings": [PEER, 1.0]}),
        (2, 1.0, {"next_pings": {PEER: -1.0}}),
        (2, 1.0, {"next_pings": {PEER: math.nan}}),
        (2, 1.0, {"next_pings": {5: 1.0}}),
        (2, 1.0, {"points": -2.0}),
        (2, 1.0, {"pollinate_protocol": "1"}),
    ],
)
def test_malformed_records_are_rejected(raw):
    with pytest.raises(InvalidRecordError):
        ServerInfo.from_tuple(raw)


def test_constructor_validates_too():
    with pytest.raises(InvalidRecordError):
        ServerInfo(ServerState.ONLINE, -1.0)
    with pytest.raises(InvalidRecordError):
        full_info().replace(end_block=1)


def test_records_are_frozen_and_hashable():
    info = full_info()
    with pytest.raises(AttributeError):
        info.state = ServerState.OFFLINE  # type: ignore[misc]
    assert hash(info) == hash(full_info())


def test_model_info_matches_petals_index_value():
    model = ModelInfo(num_blocks=80, repository="https://huggingface.co/meta-llama/Llama-2-70b-hf")
    assert model.to_dict() == {"num_blocks": 80, "repository": model.repository}
    assert ModelInfo.from_dict(wire(model.to_dict())) == model
    assert ModelInfo.from_dict({"num_blocks": 4, "new_key": 1}) == ModelInfo(4)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        (4, None),
        {},
        {"num_blocks": 0},
        {"num_blocks": 4.0},
        {"num_blocks": True},
        {"num_blocks": 4, "repository": 1},
    ],
)
def test_malformed_model_records_are_rejected(raw):
    with pytest.raises(InvalidRecordError):
        ModelInfo.from_dict(raw)


def test_span_properties():
    span = RemoteSpanInfo(PEER, 3, 7, full_info())
    assert (span.length, span.state, span.throughput) == (4, ServerState.ONLINE, 12.5)
