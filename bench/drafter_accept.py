"""How well a trained feature drafter drafts for its model, offline: teacher-forced greedy speculation.

For each prompt, local transformers (float32) generates the greedy answer and keeps the last block's
features (before the final norm) of every position, exactly what the swarm's last server returns. Then
greedy speculation is replayed over that answer: at each round the drafter proposes k tokens from the
verified tokens and features, the longest prefix equal to the answer is kept plus one token of the model's
own, and the next round starts after it (what a swarm round yields). Reported separately for the held-out
prompts (bench/drafter_prompts.py: none was trained on) and for the WAN bench's "question" prompt:
acceptance of the 1st/2nd/3rd draft token (each given that the ones before it were kept), tokens per
round for k = 1..4, and the drafter's CPU time per drafted token (its own thread's time: under load the
wall time is longer by the machine's load); the n-gram table shipped for the model (or --ngram) and prompt
lookup beside it. A tree row ("tree dDwWnN", `FeatureDrafter.draft_tree`) gives the tokens per round of
tree speculation that verifies a tree of N nodes: 1 + the longest path of the tree the answer follows
(under k=1..4: trees of depth 1..4), and its CPU time per tree.

    python bench/drafter_accept.py [--model smollm2 | FOLDER] [--drafter FOLDER] [--new-tokens 64]
        [--tree 4 4 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.drafter_prompts import HELD_OUT  # noqa: E402
from bench.train_drafter import FeatureHook, chat_ids, model_path  # noqa: E402

QUESTION = "Explain in a few sentences what a hash table is and why lookups in it are fast."  # bench/wan.py
KS = (1, 2, 3, 4)


def answers_with_features(path: Path, prompts: list[str], new_tokens: int, data: Path) -> list[dict]:
    """Each prompt's float32 greedy answer, one prompt at a time (no padding), with every position's
    features; cached in `data`."""
    key = hashlib.sha256(json.dumps([path.name, prompts, new_tokens, "fp32"]).encode()).hexdigest()[:12]
    cached = data / f"drafter-eval-{key}.pt"
    if cached.exists():
        return torch.load(cached)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hook = FeatureHook(hf)
    records = []
    try:
        for prompt in prompts:
            ids = chat_ids(tokenizer, prompt)
            with torch.no_grad():
                out = hf.generate(
                    torch.tensor([ids]),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=eos,
                )
            tokens = out[0].tolist()
            records.append(
                dict(tokens=tokens, prompt_length=len(ids), features=hook.take()[0, : len(tokens) - 1])
            )
    finally:
        hook.close()
    data.mkdir(parents=True, exist_ok=True)
    torch.save(records, cached)
    return records


def replay(records: list[dict], propose, k: int) -> dict:
    """Greedy speculation with k drafts a round over each record's answer.

    `propose(tokens, features, k)` -> draft tokens (a fresh proposer per record: `propose` is made by a
    factory called with no arguments). Returns tokens per round, acceptance of draft j given the ones
    before it were kept, and seconds per drafted token."""
    tokens_out = rounds = drafted = 0
    offered = [0] * k
    kept = [0] * k
    seconds = 0.0
    for record in records:
        draft = propose()
        sequence, features = record["tokens"], record["features"]
        t, end = record["prompt_length"], len(sequence)
        while t < end:
            room = min(k, end - 1 - t)  # the last token of the answer cannot be checked
            proposal = []
            if room > 0:
                began = time.thread_time()
                proposal = draft(sequence[:t], features[: t - 1], room)[:room]
                seconds += time.thread_time() - began
            a = 0
            while a < len(proposal) and proposal[a] == sequence[t + a]:
                a += 1
            for j in range(min(a + 1, len(proposal))):
                offered[j] += 1
                kept[j] += j < a
            drafted += len(proposal)
            t += a + 1
            tokens_out += a + 1
            rounds += 1
    return dict(
        per_round=tokens_out / rounds,
        acceptance=[kept[j] / offered[j] if offered[j] else float("nan") for j in range(k)],
        seconds=seconds / max(drafted, 1),
    )


def replay_tree(records: list[dict], make, depth: int, width: int, nodes: int) -> dict:
    """Tree speculation over each record's answer: each round the drafter's tree after the verified
    tokens; the round keeps the longest path of the tree that the answer follows, plus the model's token."""
    tokens_out = rounds = 0
    seconds = 0.0
    first = [0, 0]  # rounds whose tree held the answer's next token, rounds with a tree
    for record in records:
        drafter = make()
        sequence, features = record["tokens"], record["features"]
        t, end = record["prompt_length"], len(sequence)
        while t < end:
            room = min(depth, end - 1 - t)
            a = 0
            if room > 0:
                began = time.thread_time()
                tree = drafter.draft_tree(
                    sequence[:t], features[: t - 1], depth=room, width=width, max_nodes=nodes
                )
                seconds += time.thread_time() - began
                at = -1
                while a < room:
                    follow = [i for i, n in enumerate(tree) if n.parent == at and n.token == sequence[t + a]]
                    if not follow:
                        break
                    at, a = follow[0], a + 1
                first[0] += a > 0
                first[1] += 1
            t += a + 1
            tokens_out += a + 1
            rounds += 1
    return dict(per_round=tokens_out / rounds, first=first[0] / max(first[1], 1), seconds=seconds / rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 or a checkpoint folder")
    parser.add_argument("--drafter", type=Path, default=None, help="default: the one shipped for the model")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT / "tmp" / "data")
    parser.add_argument(
        "--measure", type=Path, default=None, help="held-out answer shards (bench/distill_answers.py)"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="draft lengths replayed")
    parser.add_argument("--ngram", type=Path, default=None, help="an n-gram table (default: the shipped one)")
    parser.add_argument(
        "--tree",
        type=int,
        nargs=3,
        default=(4, 4, 16),
        metavar=("DEPTH", "WIDTH", "NODES"),
        help="0 0 0: none",
    )
    parser.add_argument(
        "--whole-vocab", action=argparse.BooleanOptionalAction, default=True, help="a row over all tokens too"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="append the results to this file (JSON lines)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine.client.feature_drafter import (
        FeatureDrafterFactory,
        load_feature_drafter,
        shipped_drafter_path,
    )
    from engine.client.ngram_drafter import NgramDrafter, NgramTable, shipped_table_path
    from engine.client.speculative import prompt_lookup, prompt_lookup_match
    from engine.models import load_client_parts

    path = model_path(args.model, args.data)
    head = load_client_parts(path)
    folder = args.drafter or shipped_drafter_path(path.name)
    if folder is None:
        raise SystemExit(
            f"no drafter shipped for {path.name}: pass --drafter FOLDER (bench/train_drafter.py)"
        )
    factory = load_feature_drafter(folder, head)

    def feature_drafter(of):
        def make():
            drafter = of()
            return lambda tokens, features, k: drafter.draft_with_features(tokens, features, k)[0]

        return make

    def feature_with_copies():
        """As the client drafts with a feature drafter: a copy from the conversation after a match of 2+
        tokens (SpeculationConfig.lookup_min_match), else the drafter's drafts."""
        drafter = factory()

        def propose(tokens, features, k):
            copy, matched = prompt_lookup_match(tokens, k, 3)
            return copy if matched >= 2 else drafter.draft_with_features(tokens, features, k)[0]

        return propose

    drafters = {"feature": feature_drafter(factory), "feature+copies": feature_with_copies}
    if factory.draft_vocab is not None and args.whole_vocab:  # the same layer over the whole vocabulary
        drafters["feature, all"] = feature_drafter(FeatureDrafterFactory(factory.model, head))

    def lookup():
        return lambda tokens, _features, k: prompt_lookup(tokens, k, 3)

    others = {}
    table_path = args.ngram or shipped_table_path(path.name)
    if table_path is not None:
        table = NgramTable.load(table_path, head.embed_tokens.weight.shape[0])

        def ngram():
            drafter = NgramDrafter(table)
            return lambda tokens, _features, k: drafter.draft(tokens, k)[0]

        others["n-gram table"] = ngram
    others["prompt lookup"] = lookup

    sets = {}
    if args.measure is not None:  # float32 greedy answers to held-out prompts (bench/distill_answers.py)
        from bench.drafter_features import answer_records

        cache = args.data / "measure"
        measured = answer_records(path, args.measure, cache, dtype=torch.float32, held_out=True)
        sets[f"measure ({len(measured)})"] = measured
    else:
        sets[f"held-out ({len(HELD_OUT)})"] = answers_with_features(
            path, list(HELD_OUT), args.new_tokens, args.data
        )
    sets["question"] = answers_with_features(path, [QUESTION], args.new_tokens, args.data)
    ks = tuple(args.ks)
    vocab = "all tokens" if factory.draft_vocab is None else f"{len(factory.draft_vocab)} draft tokens"
    print(
        f"{path.name}, drafter {folder} ({vocab}); greedy answers of {args.new_tokens} tokens, teacher-forced"
    )
    header = (
        f"{'prompts':15} {'drafter':14} {'acc 1st':>7} {'2nd':>5} {'3rd':>5} "
        + " ".join(f"{f'k={k}':>5}" for k in ks)
        + f" {'ms/draft':>8}"
    )
    print(header + "\n" + "-" * len(header) + "   (k=N: tokens per round)")
    rows = []
    for name, records in sets.items():
        for label, make in (*drafters.items(), *others.items()):
            results = {k: replay(records, make, k) for k in ks}
            acceptance = [*results[max(ks)]["acceptance"], math.nan, math.nan][:3]
            print(
                f"{name:15} {label:14} {acceptance[0]:7.0%} {acceptance[1]:5.0%} {acceptance[2]:5.0%} "
                + " ".join(f"{results[k]['per_round']:5.2f}" for k in ks)
                + f" {results[max(ks)]['seconds'] * 1e3:8.1f}",
                flush=True,
            )
            rows.append(
                dict(
                    prompts=name,
                    drafter=label,
                    acceptance=acceptance[:3],
                    **{f"per_round_k{k}": results[k]["per_round"] for k in ks},
                    ms_per_draft=results[max(ks)]["seconds"] * 1e3,
                )
            )
        depth, width, nodes = args.tree
        if depth > 0:
            label = f"tree d{depth}w{width}n{nodes}"
            trees = {d: replay_tree(records, factory, d, width, nodes) for d in ks if d <= depth}
            last = trees[max(trees)]
            print(
                f"{name:15} {label:14} {last['first']:7.0%} {'':5} {'':5} "
                + " ".join(f"{trees[k]['per_round']:5.2f}" if k in trees else f"{'':5}" for k in ks)
                + f" {last['seconds'] * 1e3:8.1f}   (ms per tree; 1st: the tree holds the next token)",
                flush=True,
            )
            rows.append(
                dict(
                    prompts=name,
                    drafter=label,
                    first=last["first"],
                    **{f"per_round_k{k}": trees[k]["per_round"] for k in trees},
                    ms_per_tree=last["seconds"] * 1e3,
                )
            )
    if args.json is not None:
        line = dict(drafter=str(folder), notes=factory.config.notes, rows=rows, at=time.time())
        with args.json.open("a") as file:
            file.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
