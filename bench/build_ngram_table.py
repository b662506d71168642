"""Build the n-gram table of a model's own answers (engine.client.ngram_drafter) and measure it offline.

The answers are the self-distillation shards of bench/distill_answers.py (SmolLM2's greedy chat answers to
drafter_prompts.distill_prompts(), /work/data/answers/) and/or train_drafter's older drafter-data-*.pt.
The table counts, at every answer position, which tokens the model chose after the 1-4 tokens before it and
keeps each context's top few. Then, teacher-forced on answers the table never saw (the float32 measure set,
`distill_answers.py --prompts measure`, and the WAN bench's two prompts' float32 greedy answers, computed
here and cached), it reports how often the drafter's first token is the model's next one (what a round's
first draft is worth), the table's top-1 and top-k coverage by context length, beside prompt lookup.

    python bench/build_ngram_table.py --answers /work/data/answers --held-out /work/data/answers-measure \\
        [--curve 200 500 1000 2000] [--min-counts 1 2 2 3] [--out FILE | --no-save]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.client.ngram_drafter import TABLE_FILE, NgramDrafter, NgramTable  # noqa: E402
from engine.client.speculative import prompt_lookup_match  # noqa: E402

DEFAULT_OUT = ROOT / "engine" / "resources" / "ngram" / "smollm2-135m-instruct" / TABLE_FILE
VOCAB = 49152  # SmolLM2's
WAN_CACHE = Path("/work/data/answers-wan")
TOP_KS = (1, 2, 3, 4)


def read_answers(sources: list[str]) -> list[tuple[list[int], int]]:
    """(tokens, prompt_length) of every distinct answer: distill_answers shards (a folder of
    shard-*.jsonl.gz, or such files), in shard order, or train_drafter's cached drafter-*.pt records."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        files += sorted(path.glob("shard-*.jsonl.gz")) if path.is_dir() else [path]
    seen, answers = set(), []
    for path in files:
        if path.name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as file:
                rows = [json.loads(line) for line in file]
            pairs = [(r["prompt_ids"] + r["answer_ids"], len(r["prompt_ids"])) for r in rows]
        else:
            import torch

            pairs = [(r["tokens"], r["prompt_length"]) for r in torch.load(path)]
        for tokens, prompt_length in pairs:
            if tuple(tokens) not in seen:
                seen.add(tuple(tokens))
                answers.append((list(tokens), prompt_length))
    return answers


def wan_answers(new_tokens: int, cache: Path = WAN_CACHE) -> dict[str, tuple[list[int], int]]:
    """The WAN bench's prompts (bench/wan.py CHAT_PROMPTS) and SmolLM2's float32 greedy answers to them
    (transformers, one at a time), cached. Measured on only: never in a table."""
    import importlib.util

    # bench/wan.py, not the bench/wan/ package beside it
    spec = importlib.util.spec_from_file_location("wan_bench", ROOT / "bench" / "wan.py")
    wan = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = wan  # dataclasses look their module up there
    spec.loader.exec_module(wan)
    path = cache / f"wan-answers-{new_tokens}.json"
    if path.exists():
        return {k: (v[0], v[1]) for k, v in json.loads(path.read_text()).items()}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.distill_answers import chat_ids
    from engine.smollm2 import ensure_smollm2

    model = Path(ensure_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    made = {}
    for name, prompt in wan.CHAT_PROMPTS.items():
        ids = chat_ids(tokenizer, prompt)
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos
            )
        made[name] = (out[0].tolist(), len(ids))
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(made))
    return made


def measure(table: NgramTable, answers, first: int | None = None) -> dict:
    """Teacher-forced over `answers` (at most the `first` answer tokens of each): at every answer position,
    is the drafter's first token (NgramDrafter.propose: copy, sure table guess, ...), the table's top-1 (by
    context length) or any of its top-k candidates, and prompt lookup's copy, the model's next token?"""
    drafter = NgramDrafter(table)
    hits, tries = Counter(), Counter()
    for tokens, prompt_length in answers:
        end = len(tokens) if first is None else min(len(tokens), prompt_length + first)
        for i in range(prompt_length + 1, end):
            history, want = tokens[:i], tokens[i]
            tries["positions"] += 1
            proposal = drafter.propose(history, 1)[0]
            hits["drafter"] += bool(proposal) and proposal[0] == want
            tries["drafter"] += bool(proposal)
            candidates = table.candidates(history, max(TOP_KS))
            if candidates:
                top = candidates[0].context
                tries[top] += 1
                hits[top] += candidates[0].token == want
            for k in TOP_KS:
                hits[f"top{k}"] += any(g.token == want for g in candidates[:k])
            copy, _ = prompt_lookup_match(history, 1)
            tries["lookup"] += bool(copy)
            hits["lookup"] += bool(copy) and copy[0] == want
    return dict(hits=hits, tries=tries)


def share(part: int, whole: int) -> str:
    return f"{part / max(whole, 1):.0%}"


def report(name: str, result: dict, max_context: int) -> None:
    hits, tries = result["hits"], result["tries"]
    positions = tries["positions"]
    print(f"\n{name}: {positions} positions (teacher-forced; 'right' = of all positions unless noted)")
    print(f"{'drafter':<34}{'proposes at':>12}{'right when':>12}{'right':>8}")
    rows = [(f"table, {n}-token context", n) for n in range(max_context, 0, -1)]
    rows += [("prompt lookup (1 token)", "lookup"), ("ngram drafter's first token", "drafter")]
    for label, key in rows:
        print(
            f"{label:<34}{share(tries[key], positions):>12}{share(hits[key], tries[key]):>12}"
            f"{share(hits[key], positions):>8}"
        )
    print(
        "table top-k holds the next token:  "
        + "  ".join(f"k={k} {share(hits[f'top{k}'], positions)}" for k in TOP_KS)
    )


def summary(result: dict) -> str:
    hits, positions = result["hits"], result["tries"]["positions"]
    return "  ".join(
        [f"drafter {share(hits['drafter'], positions)}"]
        + [f"top{k} {share(hits[f'top{k}'], positions)}" for k in TOP_KS]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--answers", nargs="+", required=True, help="shard folders/files or drafter-data-*.pt"
    )
    parser.add_argument("--held-out", nargs="*", default=[], help="the measure set (never trained on)")
    parser.add_argument("--limit", type=int, default=None, help="build from the first N answers only")
    parser.add_argument("--curve", nargs="*", type=int, default=[], help="also measure tables of N answers")
    parser.add_argument("--min-counts", nargs="+", type=int, default=[1, 2, 2, 3], help="per context length")
    parser.add_argument("--min-share", type=float, default=0.05, help="followers below it are dropped")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-context", type=int, default=4)
    parser.add_argument(
        "--wan", action=argparse.BooleanOptionalAction, default=True, help="measure the WAN prompts"
    )
    parser.add_argument("--wan-tokens", type=int, default=192)
    parser.add_argument("--compare", type=Path, default=None, help="also measure this table (the shipped)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=VOCAB)
    args = parser.parse_args(argv)
    answers = read_answers(args.answers)[: args.limit]
    held = read_answers(args.held_out) if args.held_out else []
    trained_prompts = {tuple(t[:p]) for t, p in answers}
    overlap = [t for t, p in held if tuple(t[:p]) in trained_prompts]
    if overlap:
        print(f"warning: {len(overlap)} held-out prompts are in the training answers")
    measures = {}
    if held:
        measures["held out, first 32"] = (held, 32)  # the WAN bench's answers are 32 tokens
        measures["held out"] = (held, None)
    if args.wan:
        wan = wan_answers(args.wan_tokens)
        if any(tuple(t[:p]) in trained_prompts for t, p in wan.values()):
            raise SystemExit("a WAN bench prompt is in the training answers: never train on it")
        measures["WAN question, first 32"] = ([wan["question"]], 32)
        measures["WAN question"] = ([wan["question"]], None)
        measures["WAN rewrite, first 32"] = ([wan["rewrite"]], 32)

    def make(count: int) -> NgramTable:
        built = NgramTable.build(
            answers[:count],
            args.vocab_size,
            top_k=args.top_k,
            max_context=args.max_context,
            model="SmolLM2-135M-Instruct",
            sequences=min(count, len(answers)),
            made_by="bench/build_ngram_table.py",
        )
        return built.pruned(args.min_counts, args.min_share)

    if args.compare:
        other = NgramTable.load(args.compare, args.vocab_size)
        cells = "; ".join(f"{n}: {summary(measure(other, sets, f))}" for n, (sets, f) in measures.items())
        print(f"{args.compare} ({other.meta.get('sequences')} answers): {cells}", flush=True)
    if args.curve:
        print(
            f"learning curve (pruned as shipped: min counts {args.min_counts}, min share {args.min_share}):"
        )
        for count in [c for c in args.curve if c < len(answers)] + [len(answers)]:
            table = make(count)
            cells = "; ".join(
                f"{name}: {summary(measure(table, sets, first))}" for name, (sets, first) in measures.items()
            )
            print(f"  {count:>5} answers, {len(table.entries):>7} contexts | {cells}", flush=True)
    table = make(len(answers))
    lengths = dict(sorted(Counter(len(c) for c in table.entries).items()))
    print(
        f"\n{len(answers)} answers, {table.meta['answer_tokens']} answer tokens: "
        f"{len(table.entries)} contexts (by length {lengths})"
    )
    if not args.no_save:
        table.save(args.out)
        print(f"saved to {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    for name, (sets, first) in measures.items():
        report(name, measure(table, sets, first), table.max_context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
