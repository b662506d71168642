"""Timed greedy generations by Pollinate's client, for bench/wan.py (run as a subprocess of our venv).

    python bench/wan/pollinate_client.py MODEL --initial-peers ADDR.. --dht-prefix P --input-ids 1,2,3
        --new-tokens N --repeats R [--no-push] [--speculate] [--max-draft K]
        [--draft-blocks N]

One warm-up generation, then R timed ones, each in a fresh inference session. Prints one JSON line:
{"runs": [{"ttft": s, "step_s": s, "tokens": [...]}, ...], "speculation": {...} or null}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from engine.client.model import DistributedModelForCausalLM
from engine.client.sequence_manager import ClientConfig
from engine.client.speculative import SpeculationConfig, SpeculationStats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument("--input-ids", required=True)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-push", action="store_true", help="do not ask servers to push to each other")
    parser.add_argument("--speculate", action="store_true", help="speculative decoding (prompt lookup)")
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument(
        "--draft-blocks", type=int, default=0, help="with --speculate: draft with the first N blocks here"
    )
    args = parser.parse_args()

    ids = torch.tensor([[int(t) for t in args.input_ids.split(",")]])
    config = ClientConfig(server_to_server=not args.no_push, request_timeout=60.0)
    speculation = None
    if args.speculate:
        speculation = SpeculationConfig(
            max_draft=args.max_draft, initial_draft=min(4, args.max_draft), draft_blocks=args.draft_blocks
        )
    stats = SpeculationStats()
    runs = []
    with DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, client_config=config
    ) as model:
        for run in range(args.repeats + 1):
            run_stats = stats if run > 0 else SpeculationStats()  # the warm-up is not counted
            started = time.perf_counter()
            times, tokens = [], []
            for step in model.generate_stream(
                ids,
                max_new_tokens=args.new_tokens,
                eos_token_id=None,
                speculation=speculation,
                stats=run_stats,
            ):
                times.append(time.perf_counter())
                tokens.append(int(step.tokens[0]))
            if run > 0:
                step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
                runs.append(dict(ttft=times[0] - started, step_s=step_s, tokens=tokens))
    result = dict(runs=runs, speculation=stats.as_dict() if args.speculate else None)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
