"""Greedy generation with Pollinate's client; run by the interop tests as a subprocess of our venv.

Usage: python pollinate_client_script.py MODEL --initial-peers ADDR [ADDR ...] [--dht-prefix P]
       --input-ids 1,2,3 --max-new-tokens N [--backward] [--speculate]
Prints one JSON line {"output_ids": [...], "last_logits": [...]} on success: the greedy generation
(prompt included) and the logits after the prompt from one forward pass (rpc_forward); with --backward
also "embeds_grad", the gradient of the LM loss on the prompt w.r.t. its input embeddings (rpc_backward);
with --speculate the generation uses speculative decoding and "speculation" holds its counters.
"""

import argparse
import faulthandler
import gc
import json

import torch

from engine.client.model import DistributedModelForCausalLM
from engine.client.speculative import SpeculationConfig, SpeculationStats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", default=None)
    parser.add_argument("--input-ids", required=True, help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--backward", action="store_true", help="also report d(LM loss)/d(input embeddings)")
    parser.add_argument("--speculate", action="store_true", help="speculative decoding (prompt lookup)")
    args = parser.parse_args()

    input_ids = torch.tensor([[int(token) for token in args.input_ids.split(",")]])
    with DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix
    ) as model:
        stats = SpeculationStats()
        speculation = SpeculationConfig() if args.speculate else None
        output = model.generate(
            input_ids, max_new_tokens=args.max_new_tokens, speculation=speculation, stats=stats
        )
        with torch.no_grad():
            last_logits = model.forward(input_ids)[0, -1]
        result = {"output_ids": output[0].tolist(), "last_logits": last_logits.tolist()}
        if args.speculate:
            result["speculation"] = dict(stats.as_dict(), fallback_rounds=stats.fallback_rounds)
        if args.backward:
            embeds = model.head.embed(input_ids).detach().requires_grad_()
            logits = model.head.logits(model.blocks(embeds))
            torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]).backward()
            result["embeds_grad"] = embeds.grad[0].tolist()
        print(json.dumps(result), flush=True)
        faulthandler.dump_traceback_later(30, exit=True)  # a hang while closing shows up in the log


if __name__ == "__main__":
    main()
    # Skip the interpreter's last collections over every torch/transformers object (seconds on 2 cores).
    gc.freeze()
