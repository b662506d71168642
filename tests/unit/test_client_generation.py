"""The generation loop and token choice, against a local transformers model standing in for the swarm."""

from __future__ import annotations

import pytest
import torch

from engine.client.generation import generate, stream_generate
from engine.client.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    find_stop,
    next_tokens,
    truncate_at_stop,
)


class LocalSession:
    def __init__(self, max_length: int):
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.position = 0
        self.max_length = max_length
        self.output_ids = None
        self.closed = False
        self.fed: list[int] = []

    def close(self):
        self.closed = True


class LocalModel:
    """The GenerativeModel protocol over a local HF model with a KV cache (no swarm)."""

    def __init__(self, hf_model):
        self.hf = hf_model
        self.sessions: list[LocalSession] = []

    def inference_session(self, *, max_length: int) -> LocalSession:
        session = LocalSession(max_length)
        self.sessions.append(session)
        return session

    def session_logits(self, session: LocalSession, input_ids: torch.Tensor) -> torch.Tensor:
        assert session.position + input_ids.shape[1] <= session.max_length
        with torch.no_grad():
            out = self.hf(input_ids=input_ids, past_key_values=session.cache, use_cache=True)
        session.position += input_ids.shape[1]
        session.fed.append(input_ids.shape[1])
        return out.logits[:, -1]


@pytest.fixture(scope="module")
def hf_and_tokenizer(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint_factory("llama", num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def reference(hf, input_ids, max_new_tokens, **kwargs):
    with torch.no_grad():
        return hf.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )


@pytest.mark.parametrize("prompt_length", [1, 7, 33])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_matches_transformers(hf_and_tokenizer, prompt_length, batch):
    hf, _ = hf_and_tokenizer
    torch.manual_seed(prompt_length)
    ids = torch.randint(5, hf.config.vocab_size, (batch, prompt_length))
    params = SamplingParams(max_new_tokens=12, eos_token_id=hf.config.eos_token_id)
    model = LocalModel(hf)
    ours = generate(model, ids, params)
    assert torch.equal(ours, reference(hf, ids, 12))
    assert model.sessions[0].closed
    assert model.sessions[0].fed[0] == prompt_length and set(model.sessions[0].fed[1:]) == {1}


def test_repetition_penalty_matches_transformers(hf_and_tokenizer):
    hf, _ = hf_and_tokenizer
    ids = torch.randint(5, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_new_tokens=15, repetition_penalty=1.7)
    ours = generate(LocalModel(hf), ids, params)
    assert torch.equal(ours, reference(hf, ids, 15, repetition_penalty=1.7))


def test_streaming_yields_each_token(hf_and_tokenizer):
    hf, tokenizer = hf_and_tokenizer
    ids = torch.tensor([[10, 11, 12]])
    steps = list(stream_generate(LocalModel(hf), ids, SamplingParams(max_new_tokens=5), tokenizer=tokenizer))
    assert len(steps) == 5
    tokens = torch.stack([s.tokens for s in steps], dim=1)
    assert torch.equal(tokens, reference(hf, ids, 5)[:, 3:])
    assert "".join(s.text[0] for s in steps) == tokenizer.decode(tokens[0], skip_special_tokens=True)


def test_multi_turn_reuses_session(hf_and_tokenizer):
    hf, _ = hf_and_tokenizer
    model = LocalModel(hf)
    turn1 = torch.tensor([[20, 21, 22, 23]])
    turn2 = torch.tensor([[30, 31]])
    session = model.inference_session(max_length=64)
    out1 = generate(model, turn1, SamplingParams(max_new_tokens=6), session=session)
    out2 = generate(model, turn2, SamplingParams(max_new_tokens=6), session=session)
    assert torch.equal(out2[:, :2], turn2)
    conversation = torch.cat([out1, turn2], dim=1)
    expected = reference(hf, conversation, 6)[:, conversation.shape[1] :]
    assert torch.equal(out2[:, 2:], expected)
    # Only what the cache lacked was fed: the last token of turn 1 plus the 2 new ones.
    assert session.fed == [4, 1, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1]
    assert torch.equal(session.output_ids, torch.cat([conversation, out2[:, 2:]], dim=1))
    assert not session.closed  # the caller owns it


def test_session_too_short_is_rejected(hf_and_tokenizer):
    hf, _ = hf_and_tokenizer
    model = LocalModel(hf)
    session = model.inference_session(max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        list(
            stream_generate(
                model, torch.tensor([[1, 2, 3]]), SamplingParams(max_new_tokens=7), session=session
            )
        )


def test_eos_finishes_rows_and_pads(hf_and_tokenizer):
    hf, _ = hf_and_tokenizer
    ids = torch.randint(5, hf.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(LocalModel(hf), ids, SamplingParams(max_new_tokens=8))
    eos = int(greedy[0, 7])  # pretend row 0's third new token is the end of sequence
    params = SamplingParams(max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    ours = generate(LocalModel(hf), ids, params)
    expected = reference(hf, ids, 8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, expected)


def test_stop_strings_end_generation(hf_and_tokenizer):
    hf, tokenizer = hf_and_tokenizer
    ids = torch.tensor([[40, 41, 42]])
    full = generate(LocalModel(hf), ids, SamplingParams(max_new_tokens=10))
    text = tokenizer.decode(full[0, 3:], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and len(text) > 4
    steps = list(
        stream_generate(
            LocalModel(hf), ids, SamplingParams(max_new_tokens=10, stop=(stop,)), tokenizer=tokenizer
        )
    )
    assert steps[-1].finished.all() and len(steps) < 10
    produced = "".join(s.text[0] for s in steps)
    assert stop in produced
    assert truncate_at_stop(produced, [stop]) == text[: text.find(stop)]
    with pytest.raises(ValueError, match="tokenizer"):
        list(stream_generate(LocalModel(hf), ids, SamplingParams(stop=("x",))))


def test_sampling_is_reproducible_with_a_seed(hf_and_tokenizer):
    hf, _ = hf_and_tokenizer
    ids = torch.tensor([[50, 51, 52]])
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = generate(LocalModel(hf), ids, params)
    second = generate(LocalModel(hf), ids, params)
    assert torch.equal(first, second)
    others = {
        tuple(
            generate(
                LocalModel(hf),
                ids,
                SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, seed=s),
            )[0].tolist()
        )
        for s in range(4)
    }
    assert len(others) > 1


def test_padded_batches_are_refused(hf_and_tokenizer):
    hf, _ = hf_and_tokenizer
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="equal length"):
        generate(LocalModel(hf), torch.ones(2, 3, dtype=torch.int64), attention_mask=mask)


def test_warpers():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert apply_top_k(logits, 2).isinf().tolist() == [[True, False, False, True]]
    kept = ~apply_top_p(logits, 0.7).isinf()
    assert kept.tolist() == [[False, True, True, False]]
    assert (~apply_top_p(logits, 0.01).isinf()).sum() == 1
    penalized = apply_repetition_penalty(logits, torch.tensor([[1, 3]]), 2.0)
    assert penalized.tolist() == [[1.0, 1.5, 2.0, -2.0]]
    assert next_tokens(logits, torch.empty(1, 0, dtype=torch.int64), SamplingParams()).tolist() == [1]
    assert next_tokens(
        logits, torch.empty(1, 0, dtype=torch.int64), SamplingParams(do_sample=True, temperature=0)
    ).tolist() == [1]


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(stop=("",))
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(eos_token_id=[3, 4]).eos_ids == (3, 4)
    assert SamplingParams(eos_token_id=5).pad_id == 5


def test_find_stop():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) is None


def test_streamable_text_holds_back_partial_stops():
    from engine.client.sampling import streamable_text

    assert streamable_text("hello EN", ["END"]) == "hello "
    assert streamable_text("hello END more", ["END"]) == "hello "
    assert streamable_text("hello E", ["END", "xx"]) == "hello "
    assert streamable_text("hello", ["END"]) == "hello"
    assert streamable_text("abc", []) == "abc"
