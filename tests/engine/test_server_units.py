"""Server parts without a network: KV-cache budget, compute loop order, request parsing, config, placement."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from hivemind.utils import MSGPackSerializer

from engine.server import protocol
from engine.server.config import ConfigError, ServerConfig
from engine.server.memory_cache import AllocationFailed, MemoryCache
from engine.server.placement import PlacementError, plan_span
from engine.server.protocol import RequestError
from engine.server.task_pool import FairClock, PoolStopped, TaskKind, TaskPool, task_order
from tests.helpers.servers import DUMMY, DUMMY_INT64, pack_args

MIB = 1024**2

# --- memory cache ---


def test_memory_cache_allocates_and_frees():
    async def go():
        cache = MemoryCache(10 * MIB)
        async with cache.allocate(4 * MIB) as first:
            assert cache.used_bytes == 4 * MIB and first.nbytes == 4 * MIB
            async with cache.allocate(6 * MIB):
                assert cache.bytes_left == 0
                assert cache.tokens_left(1024) == 0
        assert cache.used_bytes == 0 and cache.num_allocations == 0

    asyncio.run(go())


def test_memory_cache_fails_at_once_without_timeout_and_says_why():
    async def go():
        cache = MemoryCache(10 * MIB)
        async with cache.allocate(8 * MIB):
            with pytest.raises(
                AllocationFailed, match=r"cache full: needs 4\.0 MiB, 2\.0 MiB free of 10\.0 MiB"
            ):
                async with cache.allocate(4 * MIB, timeout=0):
                    pass
        with pytest.raises(AllocationFailed, match="larger than the whole cache"):
            async with cache.allocate(11 * MIB, timeout=5):
                pass

    asyncio.run(go())


def test_memory_cache_waits_for_room_then_times_out():
    async def go():
        cache = MemoryCache(10 * MIB)
        holder_done = asyncio.Event()

        async def hold(seconds):
            async with cache.allocate(8 * MIB):
                await asyncio.sleep(seconds)
            holder_done.set()

        task = asyncio.create_task(hold(0.2))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        async with cache.allocate(5 * MIB, timeout=5):  # waits for the holder to finish
            assert holder_done.is_set()
        assert 0.1 < time.monotonic() - started < 2
        await task

        task = asyncio.create_task(hold(1.0))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(AllocationFailed, match=r"waited 0\.2 s"):
            async with cache.allocate(5 * MIB, timeout=0.2):
                pass
        assert time.monotonic() - started < 0.9
        await task
        assert cache.used_bytes == 0

    asyncio.run(go())


def test_memory_cache_clamps_timeout_to_max_alloc_timeout():
    async def go():
        cache = MemoryCache(1 * MIB, max_alloc_timeout=0.1)
        async with cache.allocate(1 * MIB):
            started = time.monotonic()
            with pytest.raises(AllocationFailed):
                async with cache.allocate(1 * MIB, timeout=100):
                    pass
            assert time.monotonic() - started < 1

    asyncio.run(go())


# --- task pool ---


def test_task_order_inference_first_then_priority_then_fifo():
    keys = [
        task_order(TaskKind.FORWARD, 0.0, 0),
        task_order(TaskKind.BACKWARD, -1.0, 1),
        task_order(TaskKind.INFERENCE, 5.0, 2),
        task_order(TaskKind.INFERENCE, 1.0, 3),
        task_order(TaskKind.FORWARD, 0.0, 4),
    ]
    assert [k[2] for k in sorted(keys)] == [3, 2, 1, 0, 4]


def test_task_pool_runs_queued_tasks_in_priority_order():
    pool = TaskPool()
    pool.start()
    try:
        gate = threading.Event()
        order = []
        blocker = pool.submit(gate.wait, kind=TaskKind.FORWARD)  # occupies the worker while we queue
        time.sleep(0.05)
        futures = [
            pool.submit(order.append, "forward-a", kind=TaskKind.FORWARD, priority=0),
            pool.submit(order.append, "backward-low", kind=TaskKind.BACKWARD, priority=-1),
            pool.submit(order.append, "inference", kind=TaskKind.INFERENCE, priority=9),
            pool.submit(order.append, "forward-b", kind=TaskKind.FORWARD, priority=0),
        ]
        cancelled = pool.submit(order.append, "cancelled", kind=TaskKind.INFERENCE)
        assert cancelled.cancel()
        gate.set()
        for future in (blocker, *futures):
            future.result(5)
        assert order == ["inference", "backward-low", "forward-a", "forward-b"]
        failing = pool.submit(lambda: 1 / 0, kind=TaskKind.FORWARD)
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
        assert pool.submit(lambda: 42, kind=TaskKind.FORWARD).result(5) == 42  # still alive after a failure
    finally:
        pool.stop()
    with pytest.raises(PoolStopped):
        pool.submit(print, kind=TaskKind.FORWARD)


def test_fair_clock_queues_a_peer_behind_its_own_work():
    clock = FairClock(seconds_per_unit=0.01)
    flood = [clock.arrival("flood", TaskKind.INFERENCE, 1, now=100.0) for _ in range(50)]
    assert flood[0] == 100.0 and flood[-1] == pytest.approx(100.49)
    assert clock.arrival("honest", TaskKind.INFERENCE, 1, now=100.05) == 100.05  # not behind the flood
    assert clock.arrival("flood", TaskKind.INFERENCE, 1, now=200.0) == 200.0  # idle peers keep no debt
    clock.observe(TaskKind.FORWARD, 100, 2.0)
    assert clock.seconds_per_unit[TaskKind.FORWARD] > clock.seconds_per_unit[TaskKind.INFERENCE]


def test_task_pool_shares_between_peers_not_requests():
    """Issue 12 #9: another peer's step runs next to a 50-session flood, not behind all of it."""
    pool = TaskPool()
    pool.clock = FairClock(seconds_per_unit=0.01)  # what a step costs here, as learned from earlier steps
    pool.start()
    try:
        gate = threading.Event()
        order = []
        blocker = pool.submit(gate.wait, kind=TaskKind.INFERENCE, peer="flood")
        time.sleep(0.05)
        futures = [
            pool.submit(order.append, f"flood-{i}", kind=TaskKind.INFERENCE, peer="flood") for i in range(50)
        ]
        futures.append(pool.submit(order.append, "honest", kind=TaskKind.INFERENCE, peer="honest"))
        gate.set()
        for future in (blocker, *futures):
            future.result(5)
        assert order.index("honest") <= 2, order[:5]
        assert [name for name in order if name != "honest"] == [f"flood-{i}" for i in range(50)]
    finally:
        pool.stop()


def test_task_pool_stop_fails_queued_tasks():
    pool = TaskPool()
    pool.start()
    gate = threading.Event()
    pool.submit(gate.wait, 5, kind=TaskKind.FORWARD)
    time.sleep(0.05)
    queued = pool.submit(print, kind=TaskKind.FORWARD)
    threading.Timer(0.2, gate.set).start()
    pool.stop()
    with pytest.raises(PoolStopped):
        queued.result(1)


def test_task_pool_runs_a_task_inline_only_when_idle():
    """run_if_idle computes on the caller's thread when nothing is queued or running; never beside a task."""
    pool = TaskPool()
    assert pool.run_if_idle(lambda: 1, kind=TaskKind.INFERENCE) == (False, None)  # not started
    pool.start()
    try:
        assert pool.run_if_idle(threading.get_ident, kind=TaskKind.INFERENCE) == (True, threading.get_ident())
        assert pool.stats.tasks_done[TaskKind.INFERENCE] == 1
        with pytest.raises(ZeroDivisionError):  # the caller gets the task's error; the loop stays usable
            pool.run_if_idle(lambda: 1 / 0, kind=TaskKind.INFERENCE)

        gate, started = threading.Event(), threading.Event()
        blocker = pool.submit(lambda: (started.set(), gate.wait(5)), kind=TaskKind.FORWARD)
        started.wait(5)
        assert pool.run_if_idle(print, kind=TaskKind.INFERENCE) == (False, None)  # the worker computes
        gate.set()
        blocker.result(5)

        # While an inline task computes, the worker takes nothing from the queue.
        inside, release, order = threading.Event(), threading.Event(), []

        def inline_task():
            inside.set()
            release.wait(5)
            order.append("inline")

        runner = threading.Thread(target=pool.run_if_idle, args=(inline_task,), kwargs={"kind": 0})
        runner.start()
        inside.wait(5)
        queued = pool.submit(order.append, "queued", kind=TaskKind.INFERENCE)
        assert pool.run_if_idle(print, kind=TaskKind.INFERENCE) == (False, None)  # something is queued
        time.sleep(0.1)
        assert order == []
        release.set()
        queued.result(5)
        runner.join(5)
        assert order == ["inline", "queued"]

        pool.compute_share = 0.5  # a throttled loop keeps its rests: nothing runs inline
        assert pool.run_if_idle(print, kind=TaskKind.INFERENCE) == (False, None)
    finally:
        pool.stop()


def test_step_times_summary():
    from engine.server.step_timing import StepTimes

    times = StepTimes()
    times.step(arrived=10.0, computed=10.013, seconds=0.012, inline=True)
    times.replied(10.013, now=10.0135)
    times.step(arrived=10.0335, computed=10.047, seconds=0.013, inline=False)
    times.replied(10.047, now=10.048)
    assert times.outside == [pytest.approx(0.02)]
    assert times.summary() == (
        "2 steps (1 inline), median ms: decode 0.75, compute 12.50, reply 0.75, outside 20.00"
    )


# --- protocol ---


def test_parse_span_accepts_hosted_consecutive_uids():
    assert protocol.parse_span("m.2 m.3 m.4", "m", (2, 6)) == (2, 5)
    assert protocol.parse_span("m.5", "m", (2, 6)) == (5, 6)


@pytest.mark.parametrize(
    ("uid", "message"),
    [
        ("", "names no blocks"),
        ("m.1", "does not serve 'm.1'"),
        ("m.6", "does not serve"),
        ("other.3", "does not serve 'other.3'"),
        ("m.2 m.4", "consecutive"),
        ("m.3 m.2", "consecutive"),
        ("m.x", "bad block uid"),
        ("m.2  m.3", "bad block uid"),
    ],
)
def test_parse_span_rejects_bad_uids(uid, message):
    with pytest.raises(RequestError, match=message):
        protocol.parse_span(uid, "m", (2, 6))


def test_unpack_args_follows_petals_packing():
    hidden = torch.randn(1, 2, 4)
    flat, structure = pack_args(hidden, DUMMY, DUMMY_INT64)
    # The structure survives msgpack as Petals sends it: tuples and bytes markers.
    structure = MSGPackSerializer.loads(MSGPackSerializer.dumps(structure))
    assert structure == ((b"__T0", b"__T1", b"__T2"), {})
    args = protocol.unpack_args(flat, structure)
    assert args[0] is hidden and args[1].numel() == 0 and args[2].dtype == torch.int64
    assert protocol.unpack_args(flat, None) == flat
    flat, structure = pack_args(hidden, hidden)  # the same tensor twice is sent once
    assert len(flat) == 1 and protocol.unpack_args(flat, structure) == [hidden, hidden]


@pytest.mark.parametrize(
    "structure",
    [
        "abc",
        ((b"__T5",), {}),
        ((b"__Tx",), {}),
        (((((((((((b"__T0",),),),),),),),),),), {}),
        ([b"__T0"] * 100, {}),
    ],
)
def test_unpack_args_rejects_bad_structures(structure):
    with pytest.raises(RequestError):
        protocol.unpack_args([torch.zeros(1)], structure)


def test_parse_metadata_rejects_garbage():
    assert protocol.parse_metadata(b"") == {}
    with pytest.raises(RequestError, match="msgpack"):
        protocol.parse_metadata(b"\xc1\xc1\xc1")
    with pytest.raises(RequestError, match="dict"):
        protocol.parse_metadata(MSGPackSerializer.dumps([1, 2]))
    with pytest.raises(RequestError, match="points"):
        protocol.read_number({"points": "many"}, "points", 0.0)
    with pytest.raises(RequestError, match="max_length"):
        protocol.read_max_length({"max_length": 1.5}, 100)
    with pytest.raises(RequestError, match="limit is 100"):
        protocol.read_max_length({"max_length": 101}, 100)
    with pytest.raises(RequestError, match="adapter"):
        protocol.read_active_adapter({"active_adapter": "lora"}, ())
    with pytest.raises(RequestError, match="output_compression"):
        protocol.read_output_compression({"output_compression": [99]}, 1)


def test_parse_step_validates_shapes_and_dtypes():
    good = torch.randn(2, 3, 8)
    args = protocol.parse_step([good, DUMMY, torch.tensor([1, 0])], None, 2, 8, 2)
    assert args.prompts is None and args.hypo_ids.tolist() == [1, 0]
    cases = [
        ([torch.randn(2, 3, 7), DUMMY, DUMMY_INT64], "shape"),
        ([torch.randn(3, 3, 8), DUMMY, DUMMY_INT64], "batch size 2"),
        ([good.long(), DUMMY, DUMMY_INT64], "floating"),
        ([good, torch.randn(1, 2, 3, 8), DUMMY_INT64], "prompts"),
        ([good, torch.randn(2, 2, 4, 8), DUMMY_INT64], "prompts"),
        ([good, DUMMY, torch.tensor([0, 1], dtype=torch.int32)], "int64"),
        ([good, DUMMY, torch.tensor([0, 2])], r"\[0, 2\)"),
        ([], "no hidden_states"),
    ]
    for flat, message in cases:
        with pytest.raises(RequestError, match=message):
            protocol.parse_step(flat, None, 2, 8, 2)


def test_parse_backward_needs_matching_grad_shape():
    with pytest.raises(RequestError, match="grad_outputs"):
        protocol.parse_backward([torch.randn(1, 3, 8), torch.randn(1, 2, 8)], None, 1, 8)


# --- config and placement ---


def test_config_validation_names_the_problem():
    ServerConfig(model="m", start_block=0, end_block=2)
    for fields, message in [
        (dict(start_block=1), "go together"),
        (dict(start_block=3, end_block=3), "empty"),
        (dict(start_block=0, end_block=2, num_blocks=2), "not both"),
        (dict(num_blocks=0), "positive"),
        (dict(quant="fp4"), "quant must be one of"),
        (dict(new_swarm=True, initial_peers=("/ip4/1.2.3.4/tcp/1/p2p/x",)), "new_swarm"),
        (dict(port=70000), "port"),
        (dict(step_timeout=0), "step_timeout"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ServerConfig(model="m", **fields)
    with pytest.raises(ConfigError, match="model"):
        ServerConfig(model=" ")


def test_plan_span_fixed_and_automatic(tiny_checkpoint_factory):
    from engine.models.checkpoint import load_config

    model_config = load_config(tiny_checkpoint_factory("llama", num_layers=4))
    fixed = plan_span(
        ServerConfig(model="m", start_block=1, end_block=3),
        model_config,
        free_bytes=0,
        dtype=torch.float32,
        quant="none",
    )
    assert (fixed.start, fixed.end, fixed.num_blocks) == (1, 3, 2) and fixed.weights_bytes > 0
    with pytest.raises(PlacementError, match="do not exist"):
        plan_span(
            ServerConfig(model="m", start_block=2, end_block=9),
            model_config,
            free_bytes=0,
            dtype=None,
            quant="none",
        )
    # Two blocks wanted where the swarm is weakest (blocks 2 and 3 have no server).
    auto = plan_span(
        ServerConfig(model="m", num_blocks=2),
        model_config,
        free_bytes=0,
        dtype=torch.float32,
        quant="none",
        block_throughputs=[5.0, 5.0, 0.0, 0.0],
    )
    assert (auto.start, auto.end) == (2, 4)
    everything = plan_span(
        ServerConfig(model="m"), model_config, free_bytes=2**40, dtype=torch.float32, quant="none"
    )
    assert (everything.start, everything.end) == (0, 4)
    with pytest.raises(PlacementError, match="not even one block fits"):
        plan_span(ServerConfig(model="m"), model_config, free_bytes=1000, dtype=torch.float32, quant="none")


def test_throughput_is_measured_once_and_cached(tiny_checkpoint_factory, tmp_path, monkeypatch):
    from engine.models.span import load_block_span
    from engine.server import throughput

    span = load_block_span(tiny_checkpoint_factory("llama", num_layers=4), 0, 2)
    first = throughput.get_throughput_info(span, "tiny", cache_dir=tmp_path)
    assert first["forward_rps"] > 0 and first["inference_rps"] > 0 and first["network_rps"] > 0

    def no_measuring(_span):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(throughput, "measure", no_measuring)
    assert throughput.get_throughput_info(span, "tiny", cache_dir=tmp_path) == first
    assert throughput.server_throughput(first, 3) == min(first["forward_rps"] / 2, first["network_rps"])


def test_peer_gate_holds_a_peer_to_its_slots_not_others():
    import asyncio

    from engine.server.peer_gate import PeerGate

    async def scenario():
        gate, order = PeerGate(slots=1), []
        release = asyncio.Event()

        async def request(peer: str, name: str, hold: bool):
            async with gate.enter(peer):
                order.append(name)
                if hold:
                    await release.wait()

        flood = [asyncio.ensure_future(request("flood", f"flood-{i}", True)) for i in range(50)]
        await asyncio.sleep(0.01)
        assert order == ["flood-0"] and gate.waiting("flood") == 50  # 49 wait without being worked on
        await asyncio.wait_for(request("honest", "honest", False), 1)  # not behind the flood
        release.set()
        await asyncio.gather(*flood)
        assert gate.waiting("flood") == 0 and not gate._gates  # nothing kept for peers that left
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["flood-0", "honest"] and len(order) == 51


def test_task_pool_compute_share_rests_between_tasks():
    import itertools
    import time as clock

    from engine.server.task_pool import TaskKind, TaskPool

    def busy(seconds: float) -> tuple[float, float]:
        started = clock.perf_counter()
        while clock.perf_counter() - started < seconds:
            pass
        return started, clock.perf_counter()

    pool = TaskPool()
    pool.start()
    try:
        pool.compute_share = 0.25  # after t seconds of work the loop rests 3 t
        futures = [pool.submit(busy, 0.05, kind=TaskKind.FORWARD) for _ in range(3)]
        spans = [f.result(10) for f in futures]
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        assert all(gap >= 0.14 for gap in gaps), gaps  # 3 x 0.05 s, less timer slack
        busy_time = sum(end - start for start, end in spans)
        assert busy_time / (spans[-1][1] - spans[0][0]) < 0.4
    finally:
        pool.stop()
