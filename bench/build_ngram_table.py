"""Build the n-gram table of a model's own answers (engine.client.ngram_drafter) and measure it offline.

The answers are the self-distillation data of bench/train_drafter.py (the model's greedy chat answers to the
training prompts of bench/drafter_prompts.py, cached as drafter-data-*.pt by `train_drafter.py --data-only`).
The table counts, at every answer position, which token the model chose after the 1-3 tokens before it.
Then, teacher-forced on answers the table never saw (bench/drafter_accept.py's cached held-out answers,
and the WAN bench's question), it reports how often the table's first guess is the model's next token,
by context length, beside prompt lookup's.

    python bench/train_drafter.py --data-only                     # the answers (slow: generation)
    python bench/build_ngram_table.py --records tmp/data/drafter-data-*.pt \\
        --held-out tmp/data/drafter-eval-*.pt [--out FILE]   # default: the table shipped for SmolLM2
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.client.ngram_drafter import TABLE_FILE, NgramTable  # noqa: E402
from engine.client.speculative import prompt_lookup_match  # noqa: E402

DEFAULT_OUT = ROOT / "engine" / "resources" / "ngram" / "smollm2-135m-instruct" / TABLE_FILE
VOCAB = 49152  # SmolLM2's


def read_answers(files: list[str]) -> list[tuple[list[int], int]]:
    """(tokens, prompt_length) of every distinct answer in the cached record files."""
    seen, answers = set(), []
    for name in sorted(files):
        for record in torch.load(name):
            tokens = tuple(record["tokens"])
            if tokens not in seen:
                seen.add(tokens)
                answers.append((list(tokens), record["prompt_length"]))
    return answers


def first_guess_accuracy(table: NgramTable, answers) -> dict:
    """Teacher-forced: at each answer position, is the table's (and prompt lookup's) guess the model's?"""
    hits, tries = Counter(), Counter()
    for tokens, prompt_length in answers:
        for i in range(prompt_length + 1, len(tokens)):
            guess = table.guess(tokens[:i])
            if guess is not None:
                tries[guess.context] += 1
                hits[guess.context] += guess.token == tokens[i]
            copy, _ = prompt_lookup_match(tokens[:i], 1)
            tries["lookup"] += bool(copy)
            hits["lookup"] += bool(copy) and copy[0] == tokens[i]
            tries["positions"] += 1
    return dict(hits=hits, tries=tries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", nargs="+", required=True, help="train_drafter's drafter-data-*.pt")
    parser.add_argument("--held-out", nargs="*", default=[], help="drafter_accept's drafter-eval-*.pt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=VOCAB)
    args = parser.parse_args(argv)
    answers = read_answers(args.records)
    table = NgramTable.build(answers, args.vocab_size, model="SmolLM2-135M-Instruct", sequences=len(answers))
    table.save(args.out)
    print(
        f"{len(answers)} answers, {table.meta['answer_tokens']} answer tokens: {len(table.entries)} contexts"
    )
    print(f"saved to {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    if args.held_out:
        held = read_answers(args.held_out)
        overlap = {tuple(t[:p]) for t, p in held} & {tuple(t[:p]) for t, p in answers}
        if overlap:
            print(f"warning: {len(overlap)} held-out prompts are in the training answers")
        result = first_guess_accuracy(table, held)
        hits, tries = result["hits"], result["tries"]
        print(f"held out: {len(held)} answers, {tries['positions']} positions (teacher-forced, first token)")
        print(f"{'drafter':<22}{'proposes at':>12}{'right':>8}")
        for key in (3, 2, 1, "lookup"):
            label = f"table, {key}-token context" if key != "lookup" else "prompt lookup"
            share = tries[key] / max(tries["positions"], 1)
            print(f"{label:<22}{share:>11.0%}{hits[key] / max(tries[key], 1):>8.0%}")
        right, proposed = sum(hits[k] for k in (1, 2, 3)), sum(tries[k] for k in (1, 2, 3))
        share = proposed / max(tries["positions"], 1)
        print(f"{'table, any context':<22}{share:>11.0%}{right / max(proposed, 1):>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
