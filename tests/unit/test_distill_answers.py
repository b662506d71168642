"""bench/distill_answers.py: continuous-batching greedy decoding equals transformers' greedy, one prompt at a
time, and its shards make a run resumable; bench/drafter_prompts.py's pools stay apart from the measures."""

import gzip
import json

import pytest
import torch

from bench import drafter_prompts
from bench.distill_answers import ShardWriter, SlotDecoder, answered_prompts, generate_all, parse_args


@pytest.fixture(scope="module")
def hf(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    # grouped-query attention like SmolLM2's (4 query heads share each of 2 kv heads... here 2 per kv head)
    path = tiny_checkpoint_factory("llama", num_layers=2, num_key_value_heads=2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_slots_answer_like_transformers_greedy_one_prompt_at_a_time(hf):
    generator = torch.Generator().manual_seed(0)
    prompts = [
        (f"p{i}", torch.randint(5, hf.config.vocab_size, (length,), generator=generator).tolist())
        for i, length in enumerate((3, 9, 5, 14, 2, 7, 11))
    ]
    # an end token the model actually says, so some answers stop early and free their slot mid-run
    eos = int(hf(torch.tensor([prompts[0][1]])).logits[0, -1].argmax())
    got, stops, features = {}, {}, {}

    def keep(key, answer, stop, rows):
        got[key], stops[key], features[key] = answer, stop, rows

    decoder = SlotDecoder(hf, slots=3, max_len=40, dtype=torch.float32)
    generate_all(decoder, prompts, eos, 12, keep, features=True)
    assert set(got) == {key for key, _ in prompts}  # 7 prompts through 3 slots
    assert "eos" in stops.values()
    for key, ids in prompts:
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        want = out[0, len(ids) :].tolist()
        if eos in want:
            want = want[: want.index(eos) + 1]
        assert got[key] == want, key
        assert stops[key] == ("eos" if want[-1] == eos else "length")
        # the features: the last decoder layer's output (before the final norm) at every position read
        kept = []
        hook = hf.model.layers[-1].register_forward_hook(lambda _m, _i, out, kept=kept: kept.append(out))
        try:
            with torch.inference_mode():
                hf(torch.tensor([ids + want[:-1]]))
        finally:
            hook.remove()
        expected = (kept[0][0] if isinstance(kept[0], tuple) else kept[0])[0]
        assert features[key].dtype == torch.float16 and features[key].shape == expected.shape
        torch.testing.assert_close(features[key].float(), expected, atol=2e-3, rtol=2e-3)


def test_a_prompt_longer_than_the_cache_is_refused(hf):
    decoder = SlotDecoder(hf, slots=1, max_len=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="does not fit the cache of 8"):
        decoder.prefill(0, list(range(5, 15)))


def test_shards_are_whole_numbered_and_make_the_run_resumable(tmp_path):
    writer = ShardWriter(tmp_path, 2, dict(model="m", dtype="bfloat16"))
    for i in range(5):
        row = dict(prompt=f"q{i}", prompt_ids=[1, i], answer_ids=[7, 2], stop="eos")
        writer.add(row, torch.full((3, 4), float(i), dtype=torch.float16))
    writer.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"shard-{n:05d}.{ext}" for n in range(3) for ext in ("features.pt", "jsonl.gz", "meta.json")
    ]
    assert [f[0, 0].item() for f in torch.load(tmp_path / "shard-00001.features.pt")] == [2.0, 3.0]
    with gzip.open(tmp_path / "shard-00002.jsonl.gz", "rt") as file:
        assert [json.loads(line)["prompt"] for line in file] == ["q4"]
    meta = json.loads((tmp_path / "shard-00000.meta.json").read_text())
    assert (
        meta["answers"] == 2
        and meta["answer_tokens"] == 4
        and meta["model"] == "m"
        and meta["answers_per_min"] > 0
    )
    assert answered_prompts(tmp_path) == {f"q{i}" for i in range(5)}
    # a second worker (1 of 2) beside them takes odd numbers only, so two writers never clash
    other = ShardWriter(tmp_path, 1, {}, worker=(1, 2))
    other.add(dict(prompt="q5", prompt_ids=[1], answer_ids=[2], stop="eos"))
    other.add(dict(prompt="q6", prompt_ids=[1], answer_ids=[2], stop="eos"))
    assert (tmp_path / "shard-00003.jsonl.gz").exists() and (tmp_path / "shard-00005.jsonl.gz").exists()
    assert not (tmp_path / "shard-00004.jsonl.gz").exists()


def test_the_command_line_takes_a_worker_share_and_refuses_a_wrong_one(capsys):
    args = parse_args(["--worker", "1/2", "--slots", "8"])
    assert (args.worker, args.slots, args.dtype, args.features) == ("1/2", 8, "bfloat16", True)
    with pytest.raises(SystemExit):
        parse_args(["--worker", "2/2"])
    assert "want i/n with 0 <= i < n" in capsys.readouterr().err


def test_the_distillation_pool_is_large_distinct_and_keeps_away_from_the_measures():
    pool = drafter_prompts.distill_prompts()
    assert len(pool) >= 5000 and len(set(pool)) == len(pool)
    assert pool == drafter_prompts.distill_prompts()  # the same order every time: resumable
    text = "\n".join(pool).lower()
    for word in drafter_prompts.BANNED_WORDS:  # the WAN bench's topics and HELD_OUT's
        assert word not in text, word
    measures = drafter_prompts.measure_prompts()
    assert not set(measures) & set(pool)
    for topic in drafter_prompts.MEASURE_TOPICS:
        assert topic.lower() not in text, topic
    assert "Explain in a few sentences what a hash table is and why lookups in it are fast." not in pool
    # a prefix is diverse: one prompt of every topic comes before any topic's second
    groups = len(drafter_prompts.TOPICS + drafter_prompts.MORE_TOPICS)
    first = "\n".join(pool[: groups * 3])
    assert all(topic in first for topic in drafter_prompts.MORE_TOPICS)
