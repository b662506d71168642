"""A real BlockHost on 127.0.0.1 driven by a minimal Petals 2.2-format client, compared with local compute."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from contract import LoadPhase
from engine.models.span import load_block_span
from engine.swarm.discovery import get_block_infos
from engine.swarm.records import ServerState
from tests.helpers.servers import DUMMY, DUMMY_INT64, WireClient, pack_args, running_server, wait_for

PREFIX = "tiny"
UIDS = "tiny.0 tiny.1 tiny.2 tiny.3"
HIDDEN = 64
# K+V of one token in one block of the tiny llama: 2 * 2 kv heads * 16 head dim * 4 bytes.
BYTES_PER_TOKEN_BLOCK = 256
CACHE_BYTES = 4 * BYTES_PER_TOKEN_BLOCK * 200  # room for one 4-block session of 200 tokens


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", num_layers=4)


@pytest.fixture(scope="module")
def server(checkpoint, bootstrap):
    with running_server(
        checkpoint,
        bootstrap,
        start_block=0,
        end_block=4,
        dht_prefix=PREFIX,
        cache_bytes=CACHE_BYTES,
        inference_max_length=256,
        step_timeout=3.0,
    ) as host:
        yield host


@pytest.fixture(scope="module")
def client(server):
    with WireClient(list(server.info().multiaddrs)) as wire:
        yield wire


@pytest.fixture(scope="module")
def local(checkpoint):
    """Local spans (same checkpoint) to compare with, cached by range."""
    spans = {}

    def get(start, end):
        if (start, end) not in spans:
            spans[start, end] = load_block_span(checkpoint, start, end)
        return spans[start, end]

    return get


def uids(start, end):
    return " ".join(f"{PREFIX}.{i}" for i in range(start, end))


# --- rpc_info ---


def test_rpc_info_has_petals_keys_and_schemas(client):
    info = client.info("tiny.0")
    assert info["version"].startswith("pollinate")
    assert info["dht_client_mode"] is False
    assert info["cache_tokens_available"] == CACHE_BYTES // BYTES_PER_TOKEN_BLOCK
    assert "start_from_position" in info["pollinate_features"]  # clients may roll caches back here
    assert "push_per_step" in info["pollinate_features"]  # and push a session's first step through it
    assert "tree_steps" in info["pollinate_features"]  # llama blocks take token trees
    (hidden_schema,), kwargs_schema = info["forward_schema"]
    assert kwargs_schema == {} and info["keyword_names"] == ()
    assert hidden_schema.size == (None, 1, 2048, HIDDEN) and hidden_schema.dtype == torch.float32
    assert hidden_schema.compression == runtime_pb2.CompressionType.NONE
    assert info["outputs_schema"] == (hidden_schema,)
    (hidden, prompts, hypo_ids), _ = info["inference_schema"]
    assert hidden == hidden_schema and prompts.dtype == torch.float32 and hypo_ids.dtype == torch.int64
    server_only = client.info("")
    assert "forward_schema" not in server_only and "cache_tokens_available" in server_only
    with pytest.raises(Exception, match=r"does not serve 'tiny\.9'"):
        client.info("tiny.9")


# --- forward / backward ---


@pytest.mark.parametrize(("start", "end"), [(0, 4), (1, 3)])
def test_forward_matches_local_span(client, local, start, end):
    hidden = torch.randn(2, 7, HIDDEN)
    expected = local(start, end).forward(hidden)
    assert torch.allclose(client.forward(uids(start, end), hidden), expected, atol=1e-5)
    prompts = torch.randn(end - start, 1, 3, HIDDEN)
    expected = local(start, end).forward(hidden, prompts)
    assert torch.allclose(client.forward(uids(start, end), hidden, prompts), expected, atol=1e-5)


def test_forward_stream_matches_local_span(client, local):
    hidden = torch.randn(3, 40, HIDDEN)  # ~30 KiB: several 4 KiB parts each way
    flat, structure = pack_args(hidden, DUMMY)
    (output,) = client.call_stream("rpc_forward_stream", UIDS, flat, {"args_structure": structure})
    assert torch.allclose(output, local(0, 4).forward(hidden), atol=1e-5)


def _local_grads(span, hidden, grad_out, prompts=None):
    hidden = hidden.clone().requires_grad_(True)
    leaves = [hidden]
    if prompts is not None:
        prompts = prompts.clone().requires_grad_(True)
        leaves.append(prompts)
    output = span.forward(hidden, prompts)
    return torch.autograd.grad(output, leaves, grad_out)


def test_backward_matches_local_autograd(client, local):
    hidden, grad_out = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    (grad_in,) = client.backward(uids(1, 4), hidden, grad_out)
    (expected,) = _local_grads(local(1, 4), hidden, grad_out)
    assert torch.allclose(grad_in, expected, atol=1e-5)

    prompts = torch.randn(3, 2, 2, HIDDEN)
    grad_in, grad_prompts = client.backward(uids(1, 4), hidden, grad_out, prompts)
    expected_in, expected_prompts = _local_grads(local(1, 4), hidden, grad_out, prompts)
    assert torch.allclose(grad_in, expected_in, atol=1e-5)
    assert grad_prompts.shape == prompts.shape
    assert torch.allclose(grad_prompts, expected_prompts, atol=1e-5)

    flat, structure = pack_args(hidden, grad_out, DUMMY)
    (streamed,) = client.call_stream("rpc_backward_stream", uids(1, 4), flat, {"args_structure": structure})
    assert torch.allclose(streamed, _local_grads(local(1, 4), hidden, grad_out)[0], atol=1e-5)


# --- inference ---


def test_inference_steps_match_local_forward(client, local):
    hidden = torch.randn(2, 6, HIDDEN)
    expected = local(0, 4).forward(hidden)
    with client.inference(UIDS, max_length=16) as session:
        outputs = [session.step(hidden[:, :4]), session.step(hidden[:, 4:5]), session.step(hidden[:, 5:6])]
    assert torch.allclose(torch.cat(outputs, dim=1), expected, atol=1e-5)


def test_inference_hypo_ids_and_start_from_position(client, local):
    hidden = torch.randn(2, 5, HIDDEN)
    reference = local(1, 3)
    cache = reference.new_cache(2, 8)
    reference.step(hidden[:, :3], cache)
    hypo_ids = torch.tensor([1, 1])
    expected_beam = reference.step(hidden[:, 3:4], cache, hypo_ids=hypo_ids)
    with client.inference(uids(1, 3), max_length=8) as session:
        session.step(hidden[:, :3])
        assert torch.allclose(session.step(hidden[:, 3:4], hypo_ids=hypo_ids), expected_beam, atol=1e-5)
        # Rewind to position 3 and take another branch: same as a fresh run of the prefix plus that token.
        rewound = session.step(hidden[:, 4:5], start_from_position=3)
    # After hypo_ids [1, 1] both rows continue sequence 1's prefix.
    branch = torch.cat([hidden[hypo_ids, :3], hidden[:, 4:5]], dim=1)
    assert torch.allclose(rewound, reference.forward(branch)[:, 3:4], atol=1e-5)


def test_inference_ignores_a_repeated_step_id(client, local):
    hidden = torch.randn(1, 3, HIDDEN)
    expected = local(0, 4).forward(hidden)
    with client.inference(UIDS, max_length=8) as session:
        first = session.step(hidden[:, :2], step_id="step-a")
        # The same step again (as when the previous server pushed it first): no reply, no cache change.
        flat, structure = pack_args(hidden[:, :2], DUMMY, DUMMY_INT64)
        session.send(flat, dict(session_id=session.session_id, step_id="step-a", args_structure=structure))
        second = session.step(hidden[:, 2:3], step_id="step-b")
    assert torch.allclose(torch.cat([first, second], dim=1), expected, atol=1e-5)


def test_rpc_push_delivers_a_step_to_an_open_session(client, local):
    hidden = torch.randn(1, 2, HIDDEN)
    expected = local(2, 4).forward(hidden)
    with client.inference(uids(2, 4), max_length=8) as session:
        first = session.step(hidden[:, :1], step_id="s1")
        flat, structure = pack_args(hidden[:, 1:2], DUMMY, DUMMY_INT64)
        push = runtime_pb2.ExpertRequest(
            uid=uids(2, 4),
            tensors=[serialize_torch_tensor(t) for t in flat],
            metadata=MSGPackSerializer.dumps(
                dict(session_id=session.session_id, step_id="s2", args_structure=structure, pushed=True)
            ),
        )
        client.run(client.stub.rpc_push(push))
        pushed_reply = session.receive()[0]  # the reply to the pushed step comes on the client's stream
        session.send(flat, dict(session_id=session.session_id, step_id="s2", args_structure=structure))
        third = session.step(torch.zeros(1, 1, HIDDEN), step_id="s3")  # the duplicate s2 got no reply
    assert torch.allclose(torch.cat([first, pushed_reply], dim=1), expected, atol=1e-5)
    assert third.shape == (1, 1, HIDDEN)
    # A push to a session that does not exist is ignored (Petals does the same).
    client.run(client.stub.rpc_push(runtime_pb2.ExpertRequest(uid="tiny.0", metadata=push.metadata)))


def test_tree_step_then_accepted_path_equals_the_chain(client, local):
    # Pending row + a tree of 4 candidates: 0 and 1 are sibling roots, 2 under 0, 3 under 2. The accepted
    # path [0, 2] then continues like the chain prefix, pending, rows 0, 2. The second span gets its steps
    # as a push with the same metadata (what the server before it forwards), tree fields included.
    hidden = torch.randn(1, 8, HIDDEN)
    prefix, pending, tree, after = hidden[:, :3], hidden[:, 3:4], hidden[:, 4:8], torch.randn(1, 1, HIDDEN)
    parents = [-1, -1, 0, 2]
    whole = local(0, 4)
    expected = whole.forward(torch.cat([prefix, pending, tree[:, [0, 2]], after], dim=1))
    branch_1 = whole.forward(torch.cat([prefix, pending, tree[:, [1]]], dim=1))[:, -1]

    def push(session, outputs, step_id, **extra):
        flat, structure = pack_args(outputs, DUMMY, DUMMY_INT64)
        metadata = dict(session_id=session.session_id, step_id=step_id, args_structure=structure, **extra)
        request = runtime_pb2.ExpertRequest(
            uid=uids(2, 4),
            tensors=[serialize_torch_tensor(t) for t in flat],
            metadata=MSGPackSerializer.dumps(dict(metadata, pushed=True)),
        )
        client.run(client.stub.rpc_push(request))
        return session.receive()[0]

    with (
        client.inference(uids(0, 2), max_length=16) as first,
        client.inference(uids(2, 4), max_length=16) as last,
    ):
        last.step(first.step(prefix))
        middle = first.step(torch.cat([pending, tree], dim=1), tree_parents=parents)
        out = push(last, middle, "t", tree_parents=parents)
        kept = dict(tree_accepted=[0, 2], start_from_position=6)
        continued = push(last, first.step(after, **kept), "a", **kept)
    assert middle.shape == (1, 5, HIDDEN)
    assert torch.allclose(out[:, [0, 1, 3]], expected[:, 3:6], atol=1e-5)
    assert torch.allclose(out[:, 2], branch_1, atol=1e-5)
    assert torch.allclose(continued, expected[:, -1:], atol=1e-5)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([dict(tree_parents=[-1, 5])], "earlier tree row"),
        ([dict(tree_parents=[-1, -1, -1])], "3 entries for a step of 2 rows"),
        ([dict(), dict(tree_accepted=[0])], "previous step was not a tree step"),
        ([dict(tree_parents=[-1, -1]), dict(tree_accepted=[0, 1])], "parent is -1, not 0"),
        ([dict(tree_parents=[-1, 0]), dict(tree_accepted=[0, 1], start_from_position=5)], r"int in \[0, 4\]"),
    ],
)
def test_bad_tree_metadata_gets_a_clear_error(client, steps, message):
    with client.inference(UIDS, max_length=16) as session:
        session.step(torch.randn(1, 2, HIDDEN))
        for extra in steps[:-1]:
            session.step(torch.randn(1, 2, HIDDEN), **extra)
        with pytest.raises(Exception, match=message):
            session.step(torch.randn(1, 2, HIDDEN), **steps[-1])


def test_cache_full_waits_then_fails_clearly(client, server):
    with client.inference(UIDS, max_length=150) as holder:
        holder.step(torch.randn(1, 1, HIDDEN))
        assert server.info().cache_bytes_used == 4 * 150 * BYTES_PER_TOKEN_BLOCK
        started = time.monotonic()
        full = r"cache full: needs .* MiB.*try a shorter max_length"
        with (
            client.inference(UIDS, max_length=150, alloc_timeout=0.5) as waiter,
            pytest.raises(Exception, match=full),
        ):
            waiter.step(torch.randn(1, 1, HIDDEN))
        assert time.monotonic() - started >= 0.45
        # A session that waits long enough gets the room once the holder leaves.
        threading.Timer(0.3, holder.close).start()
        with client.inference(UIDS, max_length=150, alloc_timeout=10) as patient:
            assert patient.step(torch.randn(1, 1, HIDDEN)).shape == (1, 1, HIDDEN)
    assert wait_for(lambda: server.info().cache_bytes_used == 0, timeout=5)


@pytest.mark.parametrize(
    ("first_metadata", "hidden", "message"),
    [
        (dict(max_length=1000), torch.randn(1, 1, HIDDEN), "limit is 256"),
        (dict(max_length="8"), torch.randn(1, 1, HIDDEN), "int max_length"),
        (dict(max_length=4), torch.randn(1, 5, HIDDEN), "Maximum length exceeded: prefix 0 \\+ current 5"),
        (dict(max_length=8), torch.randn(1, 1, HIDDEN + 1), r"shape \[batch, tokens, 64\]"),
        (dict(max_length=8, active_adapter="lora-x"), torch.randn(1, 1, HIDDEN), "adapter 'lora-x'"),
        (dict(max_length=8, points="lots"), torch.randn(1, 1, HIDDEN), "points"),
    ],
)
def test_inference_rejects_bad_sessions(client, first_metadata, hidden, message):
    with client.inference(UIDS, **first_metadata) as session, pytest.raises(Exception, match=message):
        session.step(hidden)


def test_inference_step_beyond_max_length_and_bad_uid(client):
    with client.inference(UIDS, max_length=3) as session:
        session.step(torch.randn(1, 2, HIDDEN))
        with pytest.raises(Exception, match="prefix 2 \\+ current 2 exceeds pre-allocated maximum 3"):
            session.step(torch.randn(1, 2, HIDDEN))
    with (
        client.inference("tiny.1 tiny.0", max_length=3) as session,
        pytest.raises(Exception, match="consecutive"),
    ):
        session.step(torch.randn(1, 1, HIDDEN))


def test_a_refusal_is_one_log_line_and_other_failures_keep_their_traceback(client):
    """hivemind logs a failed streaming handler with its traceback; our refusals (RequestError) become one
    INFO line, so a bad peer, or every client of a stopping server, cannot fill the log."""
    import logging

    from engine.server.protocol import RequestError

    records: list[logging.LogRecord] = []
    capture = logging.Handler(logging.DEBUG)
    capture.emit = records.append
    hivemind_p2p = logging.getLogger("hivemind.p2p.p2p_daemon")
    hivemind_p2p.addHandler(capture)
    try:
        with (
            client.inference(UIDS, max_length=1000) as session,
            pytest.raises(Exception, match="limit is 256"),
        ):
            session.step(torch.randn(1, 1, HIDDEN))
        assert wait_for(lambda: any("limit is 256" in record.getMessage() for record in records), timeout=10)
        refusal = next(record for record in records if "limit is 256" in record.getMessage())
        assert refusal.levelno == logging.INFO and refusal.exc_info is None
        assert refusal.getMessage().startswith("refused a request: ")
        try:  # anything else a handler raises is a bug, and keeps its warning and traceback
            raise RuntimeError("a bug")
        except RuntimeError:
            hivemind_p2p.warning("Handler failed with the exception:", exc_info=True)
        assert records[-1].levelno == logging.WARNING and records[-1].exc_info[0] is RuntimeError
        assert not any(isinstance(r.exc_info and r.exc_info[1], RequestError) for r in records)
    finally:
        hivemind_p2p.removeHandler(capture)


def test_idle_session_is_closed_after_step_timeout(client, server):
    with client.inference(UIDS, max_length=8) as session:
        session.step(torch.randn(1, 1, HIDDEN))
        time.sleep(3.5)
        with pytest.raises(Exception, match="no inference step for 3 s"):
            session.receive(timeout=10)
    assert wait_for(lambda: server.info().sessions_open == 0, timeout=5)


@pytest.mark.parametrize(
    ("method", "uid", "tensors", "metadata", "message"),
    [
        ("rpc_forward", "tiny.7", [torch.randn(1, 2, HIDDEN)], {}, "does not serve 'tiny.7'"),
        ("rpc_forward", "other.0", [torch.randn(1, 2, HIDDEN)], {}, "does not serve"),
        ("rpc_forward", UIDS, [torch.randn(1, 2, 32)], {}, r"shape \[batch, tokens, 64\]"),
        ("rpc_forward", UIDS, [torch.randn(2, HIDDEN)], {}, "shape"),
        ("rpc_forward", UIDS, [torch.randn(1, 2, HIDDEN), torch.randn(2, 1, 3, HIDDEN)], {}, "prompts"),
        (
            "rpc_forward",
            UIDS,
            [torch.randn(1, 2, HIDDEN)],
            {"args_structure": ((b"__T4",), {})},
            "refers to tensor",
        ),
        (
            "rpc_forward",
            UIDS,
            [torch.randn(1, 2, HIDDEN)],
            {"output_compression": (1, 2)},
            "output_compression",
        ),
        ("rpc_forward", UIDS, [], {}, "no hidden_states"),
        ("rpc_backward", UIDS, [torch.randn(1, 2, HIDDEN), torch.randn(1, 3, HIDDEN)], {}, "grad_outputs"),
        ("rpc_backward", UIDS, [torch.randn(1, 2, HIDDEN)], {}, "no grad_outputs"),
    ],
)
def test_bad_requests_get_clear_errors(client, local, method, uid, tensors, metadata, message):
    with pytest.raises(Exception, match=message):
        client.call(method, uid, tensors, metadata)


def test_malformed_metadata_and_server_keeps_serving(client, local, server):
    request = runtime_pb2.ExpertRequest(
        uid=UIDS, tensors=[serialize_torch_tensor(torch.randn(1, 2, HIDDEN))], metadata=b"\xc1garbage"
    )
    with pytest.raises(Exception, match="msgpack"):
        client.run(client.stub.rpc_forward(request))
    hidden = torch.randn(1, 3, HIDDEN)
    assert torch.allclose(client.forward(UIDS, hidden), local(0, 4).forward(hidden), atol=1e-5)
    info = server.info()
    assert info.requests_served > 0 and info.tokens_served > 0 and info.sessions_open == 0


def test_duplicate_session_id_is_refused(client):
    session_id = str(uuid.uuid4())
    with client.inference(UIDS, max_length=8) as first:
        first.session_id = session_id
        first.step(torch.randn(1, 1, HIDDEN))
        with client.inference(UIDS, max_length=8) as second, pytest.raises(Exception, match="already open"):
            second.session_id = session_id
            second.step(torch.randn(1, 1, HIDDEN))


# --- lifecycle ---


def test_graceful_stop_announces_offline(checkpoint, bootstrap_dht, bootstrap):
    dht, peers = bootstrap_dht, bootstrap
    reports: list[tuple[LoadPhase, float]] = []
    with running_server(
        checkpoint,
        peers,
        start_block=2,
        end_block=4,
        dht_prefix="life",
        on_progress=lambda *r: reports.append(r),
    ) as host:
        me = host.info().peer_id
        # The start reported typed phases in order, with each loaded block as a fraction (not prose).
        assert [phase for phase, _ in reports] == [
            LoadPhase.RESOLVING,
            LoadPhase.JOINING,
            LoadPhase.LOADING_BLOCKS,
            LoadPhase.LOADING_BLOCKS,
            LoadPhase.LOADING_BLOCKS,
            LoadPhase.MEASURING,
            LoadPhase.STARTING,
        ]
        assert [f for p, f in reports if p == LoadPhase.LOADING_BLOCKS] == [0.0, 0.5, 1.0]
        assert host.info().phase is None and host.info().error is None

        def state_of_block_3():
            record = get_block_infos(dht, "life", 4)[3].get(me)
            return record.state if record is not None else None

        assert wait_for(lambda: state_of_block_3() == ServerState.ONLINE, timeout=20)
        assert get_block_infos(dht, "life", 4)[3][me].cache_tokens_left > 0
    assert host.info().state.value == "stopped"
    assert wait_for(lambda: state_of_block_3() == ServerState.OFFLINE, timeout=20)


def test_auto_placement_hosts_what_fits(checkpoint, bootstrap):
    # Neither span nor count: as many blocks as memory allows (all 4 of the tiny model).
    with running_server(checkpoint, bootstrap, dht_prefix="auto", cache_bytes=CACHE_BYTES) as host:
        info = host.info()
        assert (info.start_block, info.end_block, info.total_blocks) == (0, 4, 4)
    # Two blocks where the swarm is weakest ("tiny" 0:4 is served above, so every span is equal).
    with running_server(checkpoint, bootstrap, dht_prefix="tiny", num_blocks=2) as host:
        assert host.info().end_block - host.info().start_block == 2
