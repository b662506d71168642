"""The WAN bench's delaying TCP relay: schedule (pure) and a real relay on 127.0.0.1."""

import asyncio
import random
import time

import pytest

from bench.wan.relay import Link, Relay, parse_route


def test_link_delays_each_chunk_by_the_one_way_delay():
    link = Link(0.025)
    assert link.release(10.0, 100) == pytest.approx(10.025)
    assert link.release(10.5, 100) == pytest.approx(10.525)


def test_link_keeps_order_whatever_the_jitter():
    link = Link(0.025, jitter=0.050, rng=random.Random(1))
    releases = [link.release(t * 0.001, 10) for t in range(500)]
    assert releases == sorted(releases)
    flights = [r - t * 0.001 for t, r in enumerate(releases)]
    assert min(flights) >= 0.025 - 1e-9
    assert max(flights) <= 0.075 + 1e-9


def test_link_bandwidth_serializes_chunks():
    link = Link(0.010, bytes_per_s=1000.0)  # 1 kB/s: 100 bytes take 0.1 s on the wire
    first = link.release(0.0, 100)
    second = link.release(0.0, 100)  # queued behind the first
    assert first == pytest.approx(0.110)
    assert second == pytest.approx(0.210)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        Link(-1.0)
    with pytest.raises(Exception, match="LISTEN_PORT:TARGET_PORT"):
        parse_route("8000")


async def _echo_server():
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def test_relay_adds_the_delay_both_ways_and_preserves_byte_order():
    async def main():
        echo = await _echo_server()
        relay = await Relay(0, echo.sockets[0].getsockname()[1], delay=0.030, jitter=0.010).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            rtts = []
            for _ in range(3):
                started = time.monotonic()
                writer.write(b"ping")
                await writer.drain()
                assert await reader.readexactly(4) == b"ping"
                rtts.append(time.monotonic() - started)
            # A burst of numbered chunks comes back whole and in order, jitter notwithstanding.
            payload = b"".join(i.to_bytes(4, "big") for i in range(20000))
            for offset in range(0, len(payload), 1000):
                writer.write(payload[offset : offset + 1000])
                await asyncio.sleep(0)
            await writer.drain()
            echoed = await reader.readexactly(len(payload))
            writer.close()
            return rtts, echoed, payload
        finally:
            await relay.close()
            echo.close()

    rtts, echoed, payload = asyncio.run(main())
    assert echoed == payload
    assert min(rtts) >= 0.060  # two one-way delays, at least
    assert min(rtts) < 0.060 + 0.020 + 0.5  # and not wildly more (generous: the machine is shared)
