"""Rounds of k tokens through the swarm, each rolled back, for bench/round_cost.py --wan (our venv).

    python bench/wan/round_client.py MODEL --initial-peers ADDR.. --dht-prefix P --input-ids 1,2,3
        --rows 1 2 3 4 --repeats R [--tree]

Opens one inference session (push on), sends the prompt, then R times, for every k in --rows (the order
rotating each repeat): one step of k tokens from the prompt's end (`start_from_position`, as a speculative
round after a rejected draft), its LM head on the client included, timed. `--tree` sends the k rows as a
token tree of k children of the last token (tree_parents all -1) where every server takes tree steps.
Prints one JSON line: {"rounds": {k: [seconds, ...]}, "trees": bool}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from client_args import input_ids, swarm_parser  # this folder (the script's)

from engine.client.model import DistributedModelForCausalLM
from engine.client.sequence_manager import ClientConfig


def main() -> None:
    parser = swarm_parser(repeats=10)
    parser.add_argument("--rows", nargs="+", type=int, required=True)
    parser.add_argument("--tree", action="store_true", help="send the rows as k siblings of one tree")
    args = parser.parse_args()

    ids = torch.tensor(input_ids(args))
    config = ClientConfig(request_timeout=60.0, server_to_server=True)
    rounds: dict[int, list[float]] = {k: [] for k in args.rows}
    length = ids.shape[1] + max(args.rows) + 1
    with (
        DistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, client_config=config
        ) as model,
        torch.no_grad(),
        model.inference_session(max_length=length) as session,
    ):
        session.step(model.head.embed(ids))
        past = session.position
        trees = args.tree and session.can_take_trees
        generator = torch.Generator().manual_seed(0)
        drafts = {k: torch.randint(100, 1000, (1, k), generator=generator) for k in args.rows}
        for repeat in range(args.repeats + 1):  # the first round warms up
            shift = repeat % len(args.rows)
            for k in args.rows[shift:] + args.rows[:shift]:
                started = time.perf_counter()
                hidden = session.step(
                    model.head.embed(drafts[k]),
                    start_from_position=past,
                    tree_parents=[-1] * k if trees else None,
                )
                model.head.logits(hidden).argmax(-1)
                if repeat:
                    rounds[k].append(time.perf_counter() - started)
    print(json.dumps(dict(rounds=rounds, trees=trees)), flush=True)


if __name__ == "__main__":
    main()
