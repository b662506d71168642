"""Petals wire format of client requests, and inference-session failover against fake servers (no network)."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from engine.client import inference_session as session_module
from engine.client import protocol
from engine.client.bans import RetryPolicy
from engine.client.inference_session import InferenceSession
from engine.client.routing import MissingBlocksError
from engine.client.sequence_manager import ClientConfig, SequenceManager
from engine.swarm.records import ServerInfo, ServerState
from engine.swarm.snapshot import SwarmSnapshot

PREFIX = "tiny-hf"
NUM_BLOCKS = 6
HIDDEN = 4


def test_pack_args_kwargs_matches_petals_format():
    a, b = torch.ones(2), torch.zeros(3)
    flat, structure = protocol.pack_args_kwargs(a, b, a)
    assert len(flat) == 2 and flat[0] is a and flat[1] is b
    assert structure == ((b"__T0", b"__T1", b"__T0"), {})
    # msgpack keeps tuples and bytes (hivemind's serializer), as a Petals server expects
    assert MSGPackSerializer.loads(MSGPackSerializer.dumps(structure)) == structure
    args, kwargs = protocol.unpack_args_kwargs(flat, structure)
    assert args[0] is a and args[1] is b and args[2] is a and kwargs == {}


def test_inference_request_layout():
    hidden = torch.randn(2, 3, HIDDEN)
    request = protocol.inference_request(
        "tiny-hf.0 tiny-hf.1",
        hidden,
        metadata=dict(session_id="s", step_id="t", max_length=16, points=0.0, active_adapter=None),
        compression=runtime_pb2.CompressionType.NONE,
    )
    assert request.uid == "tiny-hf.0 tiny-hf.1"
    metadata = MSGPackSerializer.loads(request.metadata)
    assert set(metadata) == {
        "session_id",
        "step_id",
        "max_length",
        "points",
        "active_adapter",
        "args_structure",
    }
    assert metadata["args_structure"] == ((b"__T0", b"__T1", b"__T2"), {})
    tensors = [deserialize_torch_tensor(t) for t in request.tensors]
    assert torch.equal(tensors[0], hidden)
    assert tensors[1].numel() == 0 and tensors[1].dtype == torch.float32  # no deep prompts
    assert tensors[2].numel() == 0 and tensors[2].dtype == torch.int64  # no hypo_ids


def test_schema_compression_reads_server_schema():
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    schema = BatchTensorDescriptor(HIDDEN, compression=runtime_pb2.CompressionType.FLOAT16)
    info = MSGPackSerializer.loads(MSGPackSerializer.dumps({"inference_schema": ((schema,), {})}))
    assert protocol.schema_compression(info, "inference_schema") == runtime_pb2.CompressionType.FLOAT16
    assert protocol.schema_compression({}, "inference_schema") == runtime_pb2.CompressionType.NONE


# --- fake swarm ---------------------------------------------------------------------------------------------


def block_fn(index: int, x: torch.Tensor, state: torch.Tensor | None):
    """A causal toy block whose output depends on every earlier input (like attention over a KV cache)."""
    prefix = torch.zeros_like(x[:, :1]) if state is None else state
    running = prefix + torch.cumsum(x, dim=1)
    out = torch.tanh(x * (1 + 0.1 * index) + 0.05 * running)
    return out, running[:, -1:]


def reference(x: torch.Tensor, start: int = 0, end: int = NUM_BLOCKS) -> torch.Tensor:
    for index in range(start, end):
        x, _ = block_fn(index, x, None)
    return x


class FakeServer:
    def __init__(
        self,
        peer_id: str,
        start: int,
        end: int,
        *,
        fail_at_step: int | None = None,
        rollback: bool = True,
        trees: bool | None = None,
    ):
        self.peer_id, self.start, self.end = peer_id, start, end
        self.trees = rollback if trees is None else trees  # announces tree_steps
        self.last_tree: dict[str, tuple[int, list[int]]] = {}  # session id -> (position of row 0, parents)
        self.fail_at_step = fail_at_step  # the n-th step (over all sessions) kills this server
        self.rollback = rollback  # announces start_from_position (a Petals 2.2 server does not)
        self.steps = 0
        self.alive = True
        self.sessions: dict[str, torch.Tensor] = {}  # session id -> every input it consumed
        self.messages: list[dict] = []

    def handle(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        if not self.alive:
            raise ConnectionError(f"{self.peer_id} is dead")
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            self.alive = False
            raise ConnectionError(f"{self.peer_id} died")
        metadata = MSGPackSerializer.loads(request.metadata)
        self.messages.append(metadata)
        flat = [deserialize_torch_tensor(t) for t in request.tensors]
        (hidden, _prompts, hypo_ids), _ = protocol.unpack_args_kwargs(flat, metadata["args_structure"])
        blocks = [int(uid.split(".")[1]) for uid in request.uid.split(" ")]
        assert blocks == list(range(blocks[0], blocks[-1] + 1))
        inputs = self.sessions.get(metadata["session_id"])
        if inputs is None:
            assert "max_length" in metadata  # the first message opens the session
            inputs = hidden[:, :0]
        if hypo_ids.numel():
            inputs = inputs[hypo_ids]
        tree = self.last_tree.pop(metadata["session_id"], None)
        if self.trees and metadata.get("tree_accepted") is not None:
            base, _ = tree  # a KeyError here: tree_accepted without a tree step before it
            kept = [base + r for r in metadata["tree_accepted"]]
            inputs = torch.cat([inputs[:, :base], inputs[:, kept]], dim=1)
        if self.rollback and metadata.get("start_from_position") is not None:
            inputs = inputs[:, : metadata["start_from_position"]]
        parents = metadata.get("tree_parents") if self.trees else None
        before = inputs
        inputs = self.sessions[metadata["session_id"]] = torch.cat([inputs, hidden], dim=1)
        # The blocks are causal: recomputing the whole history gives what a KV cache would.
        if not parents:
            x = reference(inputs, blocks[0], blocks[-1] + 1)[:, -hidden.shape[1] :]
            return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(x)])
        # A tree: the rows before it as a chain, then each tree row as the chain of its own path.
        chain = hidden.shape[1] - len(parents)
        before = torch.cat([before, hidden[:, :chain]], dim=1)
        rows = [reference(before, blocks[0], blocks[-1] + 1)[:, before.shape[1] - chain :]]
        for row in range(len(parents)):
            path, r = [], row
            while r >= 0:
                path, r = [r, *path], parents[r]
            sequence = torch.cat([before, hidden[:, [chain + i for i in path]]], dim=1)
            rows.append(reference(sequence, blocks[0], blocks[-1] + 1)[:, -1:])
        self.last_tree[metadata["session_id"]] = (before.shape[1], parents)
        return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(torch.cat(rows, dim=1))])


class FakeManager(SequenceManager):
    def __init__(self, servers: list[FakeServer], **config):
        retry = RetryPolicy(max_retries=config.pop("max_retries", 6), min_backoff=0.0, max_backoff=0.0)
        super().__init__(None, PREFIX, NUM_BLOCKS, ClientConfig(retry=retry, **config))
        self.servers = {s.peer_id: s for s in servers}

    def update(self):
        infos = {
            s.peer_id: ServerInfo(
                state=ServerState.ONLINE,
                throughput=1.0,
                start_block=s.start,
                end_block=s.end,
                inference_rps=100.0,
            )
            for s in self.servers.values()
        }
        snapshot = SwarmSnapshot.from_servers(PREFIX, NUM_BLOCKS, infos)
        self._snapshot, self._snapshot_time = snapshot, float("inf")
        return snapshot

    def rpc_info(self, peer_id, block_index=0):
        if not self.servers[peer_id].alive:
            raise ConnectionError(f"{peer_id} is dead")
        # A Pollinate server announces its extensions; a Petals 2.2 server (rollback=False) none.
        features = ["start_from_position", "push_per_step"] + ["tree_steps"] * self.servers[peer_id].trees
        return {"pollinate_features": features} if self.servers[peer_id].rollback else {}

    @property
    def p2p(self):
        return None


@pytest.fixture
def fake_streams(monkeypatch):
    """Route _SpanStream's network calls to FakeServers held by the stream's manager."""

    def open_(self):
        server = self.manager.servers[self.hop.peer_id]
        if not server.alive:
            raise ConnectionError("refused")
        self.configure(self.manager.rpc_info(self.hop.peer_id))
        self._replies = []

    async def send(self, request):
        # As on the wire: a message's failure reaches us as its reply.
        try:
            self._replies.append(self.manager.servers[self.hop.peer_id].handle(request))
        except Exception as error:
            self._replies.append(error)

    async def receive(self):
        reply = self._replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(session_module._SpanStream, "open", open_)
    monkeypatch.setattr(session_module._SpanStream, "_send", send)
    monkeypatch.setattr(session_module._SpanStream, "_receive", receive)
    monkeypatch.setattr(session_module._SpanStream, "_aclose", _noop)
    monkeypatch.setattr(session_module._SpanStream, "abort", lambda self: setattr(self, "closed", True))


async def _noop(self):
    return None


def run_steps(session: InferenceSession, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    outputs, position = [], 0
    for n in chunks:
        outputs.append(session.step(x[:, position : position + n]))
        position += n
    return torch.cat(outputs, dim=1)


def test_session_steps_match_reference(fake_streams):
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6)]
    x = torch.randn(2, 9, HIDDEN)
    with InferenceSession(FakeManager(servers), max_length=16) as session:
        out = run_steps(session, x, [5, 1, 1, 2])
        assert [(h.peer_id, h.start, h.end) for h in session.route] == [("A", 0, 3), ("B", 3, 6)]
        assert session.position == 9
    torch.testing.assert_close(out, reference(x))
    first, later = servers[0].messages[0], servers[0].messages[1]
    opening = {"session_id", "step_id", "max_length", "points", "active_adapter", "args_structure"}
    # Every step asks A to push its outputs on to B (server-to-server), naming B's session, the first too:
    # B's session was opened ahead of it by an empty step.
    assert set(first) == opening | {"next_servers"}
    assert set(later) == {"session_id", "step_id", "args_structure", "next_servers"}
    b_open, b_first = servers[1].messages[:2]
    assert set(b_open) == opening and "max_length" not in b_first
    b_session = b_open["session_id"]
    assert [list(entry) for entry in first["next_servers"]] == [["B", b_session, 3, 6]]
    assert [list(entry) for entry in later["next_servers"]] == [["B", b_session, 3, 6]]
    assert "next_servers" not in servers[1].messages[2]  # the last server has no one to push to
    assert first["max_length"] == 16 and first["step_id"] != later["step_id"]


@pytest.mark.parametrize("fail_at_step", [2, 4])
def test_failed_server_is_replaced_and_history_replayed(fake_streams, fail_at_step):
    # A and C hold the same blocks; A dies mid-generation and C takes over with a replay of A's history.
    servers = [FakeServer("A", 0, 3, fail_at_step=fail_at_step), FakeServer("B", 3, 6), FakeServer("C", 0, 3)]
    manager = FakeManager(servers)
    x = torch.randn(1, 8, HIDDEN)
    with InferenceSession(manager, max_length=16) as session:
        out = run_steps(session, x, [3, 1, 1, 1, 1, 1])
        assert [h.peer_id for h in session.route] == ["C", "B"]
    torch.testing.assert_close(out, reference(x))
    assert manager.bans.is_banned("A")
    # C got the whole prefix in its first message, then single tokens
    replay = servers[2].messages
    assert "max_length" in replay[0] and all("max_length" not in m for m in replay[1:])


def test_replacement_by_two_servers_replays_through_both(fake_streams):
    # A (0:6) dies; the new route is D (0:2) then E (2:6): E's prefix must come from D's replay.
    servers = [
        FakeServer("A", 0, 6, fail_at_step=3),
        FakeServer("D", 0, 2),
        FakeServer("E", 2, 6),
    ]
    manager = FakeManager(servers)
    manager.bans.register_failure("D")  # make A the first choice...
    manager.bans.register_failure("E")
    x = torch.randn(2, 7, HIDDEN)
    with InferenceSession(manager, max_length=16) as session:
        out = run_steps(session, x[:, :2], [2])
        manager.bans.register_success("D")  # ...and D, E the only way once A is gone
        manager.bans.register_success("E")
        out = torch.cat([out, run_steps(session, x[:, 2:], [1, 1, 1, 1, 1])], dim=1)
        assert [h.peer_id for h in session.route] == ["D", "E"]
    torch.testing.assert_close(out, reference(x))


def test_failure_of_a_middle_span_keeps_the_others(fake_streams):
    servers = [
        FakeServer("A", 0, 2),
        FakeServer("B", 2, 4, fail_at_step=3),
        FakeServer("B2", 2, 4),
        FakeServer("C", 4, 6),
    ]
    manager = FakeManager(servers)
    manager.bans.register_failure("B2")
    x = torch.randn(1, 6, HIDDEN)
    with InferenceSession(manager, max_length=8) as session:
        out = run_steps(session, x[:, :2], [2])
        manager.bans.register_success("B2")
        out = torch.cat([out, run_steps(session, x[:, 2:], [1, 1, 1, 1])], dim=1)
        assert [h.peer_id for h in session.route] == ["A", "B2", "C"]
    torch.testing.assert_close(out, reference(x))
    # A and C kept their sessions: one session each, fed one token at a time after the prompt
    assert len(servers[0].sessions) == 1 and len(servers[3].sessions) == 1


def test_gives_up_after_max_retries(fake_streams):
    servers = [FakeServer("A", 0, 6, fail_at_step=2)]
    manager = FakeManager(servers, max_retries=3)
    x = torch.randn(1, 3, HIDDEN)
    session = InferenceSession(manager, max_length=8)
    session.step(x[:, :2])
    with pytest.raises(ConnectionError):
        session.step(x[:, 2:])
    with pytest.raises(session_module.SessionClosedError):
        session.step(x[:, 2:])


def test_missing_blocks_are_reported(fake_streams):
    manager = FakeManager([FakeServer("A", 0, 2)], max_retries=1)
    with pytest.raises(MissingBlocksError) as info, InferenceSession(manager, max_length=8) as session:
        session.step(torch.randn(1, 1, HIDDEN))
    assert info.value.missing_blocks == (2, 3, 4, 5)
    assert "2-5 of 6" in str(info.value)


def test_max_length_is_enforced(fake_streams):
    manager = FakeManager([FakeServer("A", 0, 6)])
    with InferenceSession(manager, max_length=4) as session:
        session.step(torch.randn(1, 3, HIDDEN))
        with pytest.raises(ValueError, match="max_length"):
            session.step(torch.randn(1, 2, HIDDEN))


def test_stub_declares_streaming_rpcs():
    protocol.TransformerConnectionHandler._collect_rpc_handlers()
    kinds = {
        h.method_name: (h.stream_input, h.stream_output)
        for h in protocol.TransformerConnectionHandler._rpc_handlers
    }
    assert kinds["rpc_inference"] == (True, True)
    assert kinds["rpc_forward_stream"] == (True, True) and kinds["rpc_backward_stream"] == (True, True)
    assert kinds["rpc_forward"] == (False, False) and kinds["rpc_info"] == (False, False)


class CountingManager(FakeManager):
    def __init__(self, servers, **config):
        super().__init__(servers, **config)
        self.reads = 0

    def update(self):
        self.reads += 1
        snapshot = super().update()
        self._snapshot_time = __import__("time").monotonic()
        return snapshot


def test_sequence_manager_rereads_the_dht_before_reporting_missing_blocks():
    manager = CountingManager([FakeServer("A", 0, 3)])
    manager.snapshot()
    assert manager.reads == 1
    manager.servers["B"] = FakeServer("B", 3, 6)  # joined since our last read
    route = manager.make_sequence(0, NUM_BLOCKS)
    assert [(h.peer_id, h.start, h.end) for h in route] == [("A", 0, 3), ("B", 3, 6)]
    assert manager.reads == 2
    del manager.servers["B"]
    assert manager.make_sequence(0, NUM_BLOCKS) == route  # the cached view still has B
    manager.update()
    with pytest.raises(MissingBlocksError):
        manager.make_sequence(0, NUM_BLOCKS)
    with pytest.raises(ValueError):
        manager.make_sequence(2, 9)


def test_sequence_manager_caches_its_view_for_max_age():
    manager = CountingManager([FakeServer("A", 0, 6)], max_age=60.0)
    for _ in range(3):
        manager.make_sequence(0, NUM_BLOCKS)
    assert manager.reads == 1
    assert manager.snapshot(max_age=0).num_blocks == NUM_BLOCKS and manager.reads == 2


def test_sequence_manager_bans_failing_peers():
    manager = FakeManager([FakeServer("A", 0, 6), FakeServer("B", 0, 6)])
    first = manager.make_sequence(mode="min_latency")[0].peer_id
    manager.on_request_failure(first)
    second = manager.make_sequence(mode="min_latency")[0].peer_id
    assert second != first and manager.bans.is_banned(first)
    assert manager.make_sequence(mode="max_throughput")[0].peer_id == second
    manager.on_request_success(first)
    assert not manager.bans.is_banned(first)
    assert manager.request_metadata() == {"points": 0.0, "active_adapter": None}


# --- rollback (start_from_position) ---


def _rolled_back_run(servers, **config):
    """Prefill 5, a 3-token speculative step, then keep 1 of those 3 and go on with 2 new tokens."""
    x = torch.randn(1, 10, HIDDEN)
    with InferenceSession(FakeManager(servers, **config), max_length=16) as session:
        session.step(x[:, :5])
        session.step(x[:, 5:8])
        assert session.position == 8
        out = session.step(x[:, 8:10], start_from_position=6)
        assert session.position == 8
        more = session.step(x[:, 5:6], start_from_position=8)  # no-op rollback: just a step
    kept = torch.cat([x[:, :6], x[:, 8:10], x[:, 5:6]], dim=1)
    torch.testing.assert_close(torch.cat([out, more], dim=1), reference(kept)[:, 6:])
    return session


def test_rollback_cuts_the_servers_caches(fake_streams):
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6)]
    _rolled_back_run(servers)
    for server in servers:
        assert len(server.sessions) == 1  # same sessions throughout: the servers cut their caches
    assert [m.get("start_from_position") for m in servers[0].messages] == [None, None, 6, None]
    assert [m.get("start_from_position") for m in servers[1].messages] == [None, None, None, 6, None]


def test_rollback_reopens_a_server_that_cannot_cut_its_cache(fake_streams):
    # B stands for a Petals 2.2 server: it is never sent start_from_position; a fresh session replays.
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6, rollback=False)]
    _rolled_back_run(servers)
    assert len(servers[0].sessions) == 1
    assert len(servers[1].sessions) == 2
    assert all("start_from_position" not in m for m in servers[1].messages)
    replay = servers[1].messages[2]
    assert "max_length" in replay  # a new session's first message


def test_server_dying_mid_speculation_is_replaced_with_the_kept_prefix(fake_streams):
    # A dies on the rolled-back step; C replays A's history minus the rejected tokens.
    servers = [FakeServer("A", 0, 3, fail_at_step=3), FakeServer("B", 3, 6), FakeServer("C", 0, 3)]
    _rolled_back_run(servers)
    assert not servers[0].alive
    (c_inputs,) = servers[2].sessions.values()
    assert c_inputs.shape[1] == 9  # 6 kept + 2 new + 1


def test_can_roll_back_reports_the_route(fake_streams):
    with InferenceSession(FakeManager([FakeServer("A", 0, 6)]), max_length=8) as session:
        assert session.can_roll_back
    with InferenceSession(FakeManager([FakeServer("A", 0, 6, rollback=False)]), max_length=8) as session:
        assert not session.can_roll_back
        with pytest.raises(ValueError, match="start_from_position must be in"):
            session.step(torch.randn(1, 1, HIDDEN), start_from_position=3)


def test_no_push_to_a_nearby_server(fake_streams):
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6)]
    manager = FakeManager(servers)
    manager.network_rtt = lambda peer_id: 0.001  # 1 ms away: pushing saves nothing
    with InferenceSession(manager, max_length=8) as session:
        run_steps(session, torch.randn(1, 4, HIDDEN), [2, 1, 1])
    assert all("next_servers" not in m for m in servers[0].messages)
    manager.network_rtt = lambda peer_id: 0.050  # 50 ms: push
    with InferenceSession(manager, max_length=8) as session:
        run_steps(session, torch.randn(1, 4, HIDDEN), [2, 1, 1])
    assert "next_servers" in servers[0].messages[-1]


# --- the first step pushed too (servers opened ahead) ---


def test_first_step_is_pushed_through_servers_opened_ahead(fake_streams):
    servers = [FakeServer("A", 0, 2), FakeServer("B", 2, 4), FakeServer("C", 4, 6)]
    x = torch.randn(1, 6, HIDDEN)
    with InferenceSession(FakeManager(servers), max_length=8) as session:
        out = run_steps(session, x, [4, 1, 1])
    torch.testing.assert_close(out, reference(x))
    b_open, c_open = servers[1].messages[0], servers[2].messages[0]
    first = servers[0].messages[0]
    assert [list(e) for e in first["next_servers"]] == [
        ["B", b_open["session_id"], 2, 4],
        ["C", c_open["session_id"], 4, 6],
    ]
    for server in servers[1:]:
        assert len(server.sessions) == 1  # the opening step and the steps share one session
        (inputs,) = server.sessions.values()
        assert inputs.shape[1] == 6  # the empty step added nothing


def test_a_petals_first_server_is_not_asked_to_push_its_first_step(fake_streams):
    # Petals 2.2 pushes every step with its first message's metadata: it gets next_servers later only.
    servers = [FakeServer("A", 0, 3, rollback=False), FakeServer("B", 3, 6)]
    x = torch.randn(1, 5, HIDDEN)
    with InferenceSession(FakeManager(servers), max_length=8) as session:
        out = run_steps(session, x, [3, 1, 1])
    torch.testing.assert_close(out, reference(x))
    assert "next_servers" not in servers[0].messages[0]
    assert "next_servers" in servers[0].messages[1]


@pytest.mark.parametrize("fail_at_step", [1, 2])
def test_a_server_opened_ahead_that_fails_is_replaced(fake_streams, fail_at_step):
    # B refuses the opening empty step (1) or fails on the first real one (2); D takes its blocks over.
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6, fail_at_step=fail_at_step), FakeServer("D", 3, 6)]
    manager = FakeManager(servers)
    x = torch.randn(1, 5, HIDDEN)
    with InferenceSession(manager, max_length=8) as session:
        out = run_steps(session, x, [3, 1, 1])
        assert [hop.peer_id for hop in session.route] == ["A", "D"]
    torch.testing.assert_close(out, reference(x))
    assert not servers[1].alive
    (d_inputs,) = servers[2].sessions.values()
    assert d_inputs.shape[1] == 5


def test_a_petals_server_is_not_opened_ahead(fake_streams):
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6, rollback=False)]
    x = torch.randn(1, 5, HIDDEN)
    with InferenceSession(FakeManager(servers), max_length=8) as session:
        out = run_steps(session, x, [3, 1, 1])
    torch.testing.assert_close(out, reference(x))
    assert "max_length" in servers[1].messages[0] and len(servers[1].messages) == 3
    assert "next_servers" not in servers[0].messages[0]  # B's session does not exist yet
    assert "next_servers" in servers[0].messages[1]


def test_nearby_servers_are_not_opened_ahead(fake_streams):
    servers = [FakeServer("A", 0, 3), FakeServer("B", 3, 6)]
    manager = FakeManager(servers)
    manager.network_rtt = lambda peer_id: 0.001
    with InferenceSession(manager, max_length=8) as session:
        run_steps(session, torch.randn(1, 4, HIDDEN), [2, 1, 1])
    assert "max_length" in servers[1].messages[0] and servers[1].messages[0]["args_structure"]
    assert len(servers[1].messages) == 3  # no opening step


# --- tree steps ---------------------------------------------------------------------------------------------

TREE = [-1, -1, 0, 2]  # after the pending row: two candidate roots, a child of root 0, its child


def _tree_reference(prefix: torch.Tensor, pending: torch.Tensor, tree: torch.Tensor) -> torch.Tensor:
    """What each row of [pending, tree] computes: pending after the prefix, each tree row after its path."""
    before = torch.cat([prefix, pending], dim=1)
    rows = [reference(before)[:, -1:]]
    for path in ([0], [1], [0, 2], [0, 2, 3]):
        rows.append(reference(torch.cat([before, tree[:, path]], dim=1))[:, -1:])
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("fail_at_step", [None, 2, 3])  # no failure, A dies at the tree step, at the next
def test_tree_step_and_accepted_path_equal_the_chain_through_failover(fake_streams, fail_at_step):
    servers = [FakeServer("A", 0, 3, fail_at_step=fail_at_step), FakeServer("B", 3, 6), FakeServer("C", 0, 3)]
    manager = FakeManager(servers)
    manager.bans.register_failure("C")  # A first; C only once A is gone
    x = torch.randn(1, 9, HIDDEN)
    prefix, pending, tree, after = x[:, :3], x[:, 3:4], x[:, 4:8], x[:, 8:9]
    with InferenceSession(manager, max_length=16) as session:
        session.step(prefix)
        manager.bans.register_success("C")
        assert session.can_take_trees
        out = session.step(torch.cat([pending, tree], dim=1), tree_parents=TREE)
        torch.testing.assert_close(out, _tree_reference(prefix, pending, tree))
        assert session.position == 8
        session.accept_tree([0, 2])
        assert session.position == 6
        last = session.step(after)
        with pytest.raises(ValueError, match="needs a tree step"):
            session.accept_tree([0])
    chain = torch.cat([prefix, pending, tree[:, [0, 2]], after], dim=1)
    torch.testing.assert_close(last, reference(chain)[:, -1:])
    b = [m for m in servers[1].messages if "args_structure" in m]
    assert b[-2]["tree_parents"] == TREE and b[-1]["tree_accepted"] == [0, 2]
    if fail_at_step is not None:  # C rebuilt A's cache from our history: the tree again, or the kept path
        replay = servers[2].messages[0]
        assert ("tree_parents" in replay) == (fail_at_step == 2) and "tree_accepted" not in replay


def test_a_replacement_without_trees_abandons_the_tree_step(fake_streams):
    # A dies at the tree step and only D, which takes no trees, holds its blocks: the step is abandoned (the
    # speculative loop then runs an ordinary round) and the session goes on consistently.
    servers = [FakeServer("A", 0, 3, fail_at_step=2), FakeServer("B", 3, 6)]
    servers.append(FakeServer("D", 0, 3, trees=False))
    manager = FakeManager(servers)
    manager.bans.register_failure("D")
    x = torch.randn(1, 6, HIDDEN)
    with InferenceSession(manager, max_length=16) as session:
        session.step(x[:, :3])
        manager.bans.register_success("D")
        with pytest.raises(session_module.TreeStepsUnsupportedError):
            session.step(torch.randn(1, 3, HIDDEN), tree_parents=[-1, -1])
        assert session.position == 3 and not session.can_take_trees
        out = session.step(x[:, 3:6])
        assert [h.peer_id for h in session.route] == ["D", "B"]
    torch.testing.assert_close(out, reference(x)[:, 3:])


def test_routes_with_a_petals_server_take_no_trees(fake_streams):
    servers = [FakeServer("A", 0, 3), FakeServer("P", 3, 6, rollback=False)]
    with InferenceSession(FakeManager(servers), max_length=16) as session:
        assert not session.can_take_trees
        with pytest.raises(ValueError, match="earlier tree row"):
            session.step(torch.randn(1, 2, HIDDEN), tree_parents=[0, 0])
