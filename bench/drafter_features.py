"""Training records for the feature drafter from self-distilled answers (bench/distill_answers.py's shards).

A record is what bench/train_drafter.py trains on: the tokens of prompt + answer, where the answer starts,
and the features (the last decoder layer's output before the final norm, what the swarm's last server
returns) of every position but the last, float16 [n - 1, d]. Features come from a `shard-NNNNN.features.pt`
beside the shard when the generator kept them, else from a teacher-forced prefill over prompt + answer here
(batched, right-padded: causal attention keeps the padding out of every real position), cached per shard in
--features (default /work/data/features/). Prompts of the held-out sets (bench/drafter_prompts.py HELD_OUT
and the WAN bench's question) are never used, whatever the shards hold.

    python bench/drafter_features.py [--answers /work/data/answers] [--limit N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.drafter_prompts import HELD_OUT  # noqa: E402

ANSWERS = Path("/work/data/answers")
FEATURES = Path("/work/data/features")
QUESTION = "Explain in a few sentences what a hash table is and why lookups in it are fast."  # bench/wan.py
NEVER = {*HELD_OUT, QUESTION}


def read_shard(shard: Path, held_out: bool = False) -> list[dict]:
    """A shard's answers that may be trained on: {"prompt", "prompt_ids", "answer_ids", "stop"} each
    (`held_out`: a measuring set's, all of them)."""
    with gzip.open(shard, "rt", encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    return [
        line for line in lines if (held_out or line["prompt"] not in NEVER) and len(line["answer_ids"]) >= 2
    ]


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.jsonl.gz"))


class NotReady(Exception):
    """A shard whose generator-written features cannot be read yet."""


class LastLayerHook:
    """Keeps the last decoder layer's output (the features, before the final norm) of one forward."""

    def __init__(self, hf):
        self.output = None
        self.handle = hf.model.layers[-1].register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output):
        self.output = (output[0] if isinstance(output, tuple) else output).detach()

    def close(self) -> None:
        self.handle.remove()


def prefill_features(hf, sequences: list[list[int]], batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Each sequence's features for its positions 0..n-2 (float16), from teacher-forced prefills of
    right-padded batches of similar lengths (about `batch_tokens` tokens a batch)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    hook = LastLayerHook(hf)
    try:
        first = 0
        while first < len(order):
            width = len(sequences[order[first]])
            group = [order[first]]
            while first + len(group) < len(order):
                longer = len(sequences[order[first + len(group)]])
                if longer * (len(group) + 1) > batch_tokens:
                    break
                group.append(order[first + len(group)])
                width = longer
            ids = torch.zeros(len(group), width, dtype=torch.int64)
            for row, i in enumerate(group):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            with torch.no_grad():
                hf.model(input_ids=ids, use_cache=False)
            for row, i in enumerate(group):
                out[i] = hook.output[row, : len(sequences[i]) - 1].to(torch.float16).clone()
            first += len(group)
    finally:
        hook.close()
    return out


def shard_records(
    shard: Path, cache: Path, dtype: torch.dtype, load_model, held_out: bool = False
) -> list[dict]:
    """The training records of one shard (features from the generator's file, else computed and cached)."""
    lines = read_shard(shard, held_out)
    stem = shard.name.removesuffix(".jsonl.gz")
    sequences = [line["prompt_ids"] + line["answer_ids"] for line in lines]
    kept = shard.with_name(f"{stem}.features.pt")
    cached = cache / f"{stem}-{str(dtype).removeprefix('torch.')}.pt"
    meta = shard.with_name(f"{stem}.meta.json")
    promised = meta.exists() and json.loads(meta.read_text()).get("features", False)
    if promised or kept.exists():
        try:
            by_prompt = dict(zip(_prompts(shard), torch.load(kept), strict=True))
        except (OSError, RuntimeError, ValueError) as error:  # still being written by the generator
            raise NotReady(f"{kept.name}: {error}") from error
        features = [by_prompt[line["prompt"]] for line in lines]
    elif cached.exists():
        features = torch.load(cached)
    else:
        began = time.perf_counter()
        features = prefill_features(load_model(), sequences)
        cache.mkdir(parents=True, exist_ok=True)
        aside = cached.with_name(cached.name + ".part")
        torch.save(features, aside)
        aside.rename(cached)
        seconds = time.perf_counter() - began
        print(f"  {shard.name}: {len(lines)} answers' features in {seconds:.0f} s", flush=True)
    records = []
    for line, tokens, feats in zip(lines, sequences, features, strict=True):
        if feats.shape[0] != len(tokens) - 1:
            raise ValueError(f"{shard.name}: features of {feats.shape[0]} positions for {len(tokens)} tokens")
        records.append(dict(tokens=tokens, prompt_length=len(line["prompt_ids"]), features=feats))
    return records


def _prompts(shard: Path) -> list[str]:
    with gzip.open(shard, "rt", encoding="utf-8") as file:
        return [json.loads(line)["prompt"] for line in file]


def answer_records(
    model_path: Path,
    answers: Path = ANSWERS,
    cache: Path = FEATURES,
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
    held_out: bool = False,
) -> list[dict]:
    """Records of the first `limit` usable answers of the shards in `answers` (all: None), shard by shard
    (`held_out`: a measuring set, whose prompts are kept whatever they are)."""
    model = None

    def load_model():
        nonlocal model
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        return model

    records: list[dict] = []
    found = shards(answers)
    if not found:
        raise SystemExit(f"no answer shards (shard-*.jsonl.gz) in {answers}: run bench/distill_answers.py")
    for shard in found:
        if limit is not None and len(records) >= limit:
            break
        try:
            records += shard_records(shard, cache, dtype, load_model, held_out)
        except NotReady as error:
            print(f"  skipping {shard.name}: its features cannot be read (yet?): {str(error)[:80]}")
    return records if limit is None else records[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 or a checkpoint folder")
    parser.add_argument("--answers", type=Path, default=ANSWERS)
    parser.add_argument("--features", type=Path, default=FEATURES)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--watch", type=float, default=0, help="look for new shards every N s (until killed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.train_drafter import model_path

    path = model_path(args.model, args.features)
    dtype = getattr(torch, args.dtype)
    if args.watch:  # keep up with a running generator: each new shard's features as it appears
        hf = None
        while True:
            for shard in shards(args.answers):
                stem = shard.name.removesuffix(".jsonl.gz")
                done = args.features / f"{stem}-{args.dtype}.pt"
                if done.exists() or shard.with_name(f"{stem}.features.pt").exists():
                    continue
                if hf is None:
                    from transformers import AutoModelForCausalLM

                    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
                shard_records(shard, args.features, dtype, lambda model=hf: model)
            time.sleep(args.watch)
    records = answer_records(path, args.answers, args.features, args.limit, dtype)
    answer_tokens = sum(len(r["tokens"]) - r["prompt_length"] for r in records)
    print(f"{len(records)} answers, {answer_tokens} answer tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
