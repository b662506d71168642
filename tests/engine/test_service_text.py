"""Pure parts of the service: stop-sequence holdback, incremental decoding, configuration checks."""

from __future__ import annotations

import pytest

from engine.service import IncrementalDecoder, ServiceConfig, TextHoldback


def _run(pieces, stops):
    holdback = TextHoldback(tuple(stops))
    out, stopped = [], False
    for piece in pieces:
        text, stopped = holdback.feed(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(holdback.flush())
    return "".join(out), stopped, out


def test_stop_split_across_pieces_is_never_sent():
    text, stopped, out = _run(["Hello <", "|en", "d|> more"], ["<|end|>"])
    assert text == "Hello " and stopped
    assert all("<" not in piece for piece in out)


def test_false_start_of_a_stop_is_released():
    text, stopped, _ = _run(["a <", "b", " c"], ["<|end|>"])
    assert text == "a <b c" and not stopped


def test_earliest_of_several_stops_wins():
    assert _run(["one two three"], ["three", "two"])[0] == "one "


def test_no_stops_streams_everything():
    assert _run(["a", "b"], [])[2] == ["a", "b", ""]


class _Bytes:
    """A tokenizer whose tokens are single bytes of UTF-8 (so characters can arrive in halves)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_waits_for_whole_characters():
    decoder = IncrementalDecoder(_Bytes())
    data = list("aé".encode())  # "é" is two bytes
    assert decoder.step(data[:1]) == "a"
    assert decoder.step(data[:2]) == ""  # half of "é"
    assert decoder.step(data[:3]) == "é"
    assert decoder.finish(data[:3]) == ""
    half = IncrementalDecoder(_Bytes())
    assert half.step(data[:1]) == "a"
    assert half.step(data[:2]) == ""
    assert half.finish(data[:2]) == "\ufffd"  # the end: what transformers' decode shows too


@pytest.mark.parametrize(
    "fields",
    [dict(swarm="moon"), dict(swarm="local", initial_peers=("/ip4/1.2.3.4",))],
)
def test_service_config_rejects_bad_combinations(tmp_path, fields):
    with pytest.raises(ValueError):
        ServiceConfig(data_dir=tmp_path, **fields)


def test_private_swarm_without_peers_is_created_here(tmp_path):
    from engine.service import EngineService

    assert EngineService(ServiceConfig(data_dir=tmp_path, swarm="private")).creates_private_swarm
    joined = ServiceConfig(data_dir=tmp_path, swarm="private", initial_peers=("/ip4/1.2.3.4/tcp/1/p2p/Qm",))
    assert not EngineService(joined).creates_private_swarm
