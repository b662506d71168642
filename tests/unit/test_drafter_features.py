"""Training records from self-distilled answer shards: held-out prompts dropped, batched prefill features
equal to one sequence at a time, features cached per shard or taken from the generator's file."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from bench.drafter_features import QUESTION, answer_records, prefill_features
from bench.drafter_prompts import HELD_OUT


def write_shard(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as file:
        for line in lines:
            file.write(json.dumps(line) + "\n")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama", num_layers=2)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def alone(hf, tokens):
    kept = []
    hook = hf.model.layers[-1].register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([tokens]))
    finally:
        hook.remove()
    out = kept[0][0] if isinstance(kept[0], tuple) else kept[0]
    return out[0, :-1]


def test_answer_shards_become_records_without_the_held_out_prompts(tiny, tmp_path):
    path, hf = tiny
    generator = torch.Generator().manual_seed(3)

    def line(prompt, n_prompt, n_answer):
        ids = torch.randint(3, 200, (n_prompt + n_answer,), generator=generator).tolist()
        return dict(prompt=prompt, prompt_ids=ids[:n_prompt], answer_ids=ids[n_prompt:], stop="eos")

    answers = tmp_path / "answers"
    answers.mkdir()
    first = [line("a", 5, 9), line(HELD_OUT[0], 6, 4), line("b", 3, 17), line("c", 8, 1)]
    write_shard(answers / "shard-00000.jsonl.gz", first)
    write_shard(answers / "shard-00001.jsonl.gz", [line(QUESTION, 4, 6), line("d", 7, 12)])
    cache = tmp_path / "features"
    records = answer_records(path, answers, cache)
    # The held-out prompt and the WAN question are never trained on; a 1-token answer teaches nothing.
    assert [r["prompt_length"] for r in records] == [5, 3, 7]
    for r, source in zip(records, [first[0], first[2]], strict=False):
        assert r["tokens"] == source["prompt_ids"] + source["answer_ids"]
    for r in records:
        expected = alone(hf, r["tokens"])
        assert r["features"].dtype == torch.float16 and r["features"].shape == expected.shape
        assert torch.allclose(r["features"].float(), expected, atol=2e-2, rtol=1e-2)
    assert sorted(p.name for p in cache.iterdir()) == ["shard-00000-float32.pt", "shard-00001-float32.pt"]
    # Cached: a second read gives the same records without a model; a limit takes the first answers.
    again = answer_records(path / "no-model-here", answers, cache, limit=2)
    assert len(again) == 2
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(again, records[:2], strict=True))
    # Features the generator kept beside the shard are used as they are.
    kept = [torch.full((len(x["prompt_ids"]) + len(x["answer_ids"]) - 1, 8), 0.5) for x in first]
    torch.save(kept, answers / "shard-00000.features.pt")
    mine = answer_records(path / "no-model-here", answers, tmp_path / "other-cache", limit=2)
    assert all(float(r["features"].float().mean()) == 0.5 for r in mine)


def test_batched_prefill_features_equal_one_sequence_at_a_time(tiny):
    _, hf = tiny
    generator = torch.Generator().manual_seed(4)
    sequences = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (12, 5, 30, 7, 19)]
    features = prefill_features(hf, sequences, batch_tokens=40)  # several batches of similar lengths
    for tokens, got in zip(sequences, features, strict=True):
        assert torch.allclose(got.float(), alone(hf, tokens), atol=2e-2, rtol=1e-2)
