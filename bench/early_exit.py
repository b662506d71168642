"""How well a model's own blocks draft for it: greedy acceptance of early-exit and layer-skip drafters.

For each chat prompt, local transformers generates the greedy answer; then, for each draft layer choice
(the first n blocks, or every k-th block), the drafter's greedy prediction at every position of that answer
is compared with the answer (teacher forcing: exactly what greedy speculative decoding accepts, since a
round stops at the first miss). Prints per-token acceptance, tokens per round with k = 1, 2, 4 drafts, and
for the first-n drafters the client's drafting time per token (engine.client.early_exit, THREADS threads)
beside the full model's local step.

    python bench/early_exit.py [--model smollm2 | FOLDER] [--new-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROMPTS = (
    "Explain in a few sentences what a hash table is and why lookups in it are fast.",
    "What are three tips for staying focused while working from home?",
    "Why is the sky blue?",
    "Write a short email to a colleague asking to move our meeting to Thursday.",
    "Rewrite this paragraph in simpler words: The committee has determined that, owing to unforeseen "
    "budgetary constraints, the construction of the new library will be postponed until the subsequent "
    "fiscal year.",
)


def rounds(predictions: list[tuple[int, list[int], list[int]]], k: int) -> tuple[float, float]:
    """(acceptance per draft token, tokens per round) of greedy speculation with k drafts a round.

    Each entry: (prompt length, the whole greedy sequence, the drafter's argmax after each position)."""
    tokens = rounds_ = drafted = accepted = 0
    for start, sequence, predicted in predictions:
        t, end = start, len(sequence)
        while t < end:
            a = 0
            while a < k and t + a < end - 1 and predicted[t - 1 + a] == sequence[t + a]:
                a += 1
            drafted += min(k, end - 1 - t)
            accepted += a
            t += a + 1
            tokens += a + 1
            rounds_ += 1
    return accepted / max(drafted, 1), tokens / rounds_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 or a checkpoint folder")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.client.early_exit import EarlyExitDrafter
    from engine.models import load_block_span, load_client_parts

    with tempfile.TemporaryDirectory(prefix="pollinate-early-exit-") as tmp:
        path = Path(args.model)
        if args.model == "smollm2":
            from engine.smollm2 import ensure_smollm2

            path = Path(ensure_smollm2(Path(tmp)))
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        layers, total = hf.model.layers, hf.config.num_hidden_layers
        sequences = []
        with torch.no_grad():
            for prompt in PROMPTS:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                out = hf.generate(
                    ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
                )
                sequences.append((ids.shape[1], out))

        def predictions(chosen: list[int]):
            hf.model.layers = torch.nn.ModuleList(layers[i] for i in chosen)
            hf.config.num_hidden_layers = len(chosen)
            try:
                with torch.no_grad():
                    return [
                        (
                            start,
                            seq[0].tolist(),
                            hf(input_ids=seq, use_cache=False).logits[0].argmax(-1).tolist(),
                        )
                        for start, seq in sequences
                    ]
            finally:
                hf.model.layers, hf.config.num_hidden_layers = layers, total

        head = load_client_parts(path)
        full_step = draft_step(EarlyExitDrafter(head, load_block_span(path, 0, total)), sequences)
        choices = {
            f"first {n}": list(range(n)) for n in sorted({2, 4, 8, total // 2, 2 * total // 3, total - 2})
        }
        choices |= {f"every {k}th": sorted({*range(0, total, k), total - 1}) for k in (2, 3)}
        print(f"{path.name}: {total} blocks, {len(PROMPTS)} chat prompts x {args.new_tokens} greedy tokens")
        print(f"full model on the client: {full_step * 1e3:.1f} ms per token ({args.threads} threads)")
        header = (
            f"{'drafter':12} {'blocks':>6} {'accept':>7} {'tok/rnd k=1':>11} {'k=2':>5} {'k=4':>5} "
            f"{'ms/draft':>8}"
        )
        print(header)
        print("-" * len(header))
        for name, chosen in choices.items():
            found = predictions(chosen)
            acceptance, _ = rounds(found, 1)
            per_round = [rounds(found, k)[1] for k in (1, 2, 4)]
            cost = "-"
            if name.startswith("first"):
                span = load_block_span(path, 0, len(chosen))
                cost = f"{draft_step(EarlyExitDrafter(head, span), sequences) * 1e3:.1f}"
            print(
                f"{name:12} {len(chosen):6} {acceptance:7.0%} {per_round[0]:11.2f} {per_round[1]:5.2f} "
                f"{per_round[2]:5.2f} {cost:>8}",
                flush=True,
            )
    return 0


def draft_step(drafter, sequences, tokens: int = 16) -> float:
    """Seconds per drafted token once the prompt is read (median over the prompts)."""
    times = []
    for start, seq in sequences:
        history = seq[0, :start].tolist()
        drafter.draft(history, 1)  # read the prompt
        began = time.perf_counter()
        drafter.draft(history, tokens)
        times.append((time.perf_counter() - began) / tokens)
    times.sort()
    return times[len(times) // 2]


if __name__ == "__main__":
    sys.exit(main())
