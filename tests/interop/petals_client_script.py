"""Greedy generation with the published Petals client; run by the interop tests inside the Petals venv.

Usage: python petals_client_script.py MODEL --initial-peers ADDR [ADDR ...] [--dht-prefix P]
       --input-ids 1,2,3 --max-new-tokens N [--backward]
Prints one JSON line {"output_ids": [...], "last_logits": [...]} on success: the greedy generation
(prompt included) and the logits after the prompt from one forward pass (rpc_forward); with --backward
also "embeds_grad", the gradient of the LM loss on the prompt w.r.t. its input embeddings (rpc_backward).
"""

import argparse
import faulthandler
import gc
import json

import torch
from petals import AutoDistributedModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", default=None)
    parser.add_argument("--input-ids", required=True, help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--backward", action="store_true", help="also report d(LM loss)/d(input embeddings)")
    args = parser.parse_args()

    kwargs = {"initial_peers": args.initial_peers, "torch_dtype": torch.float32}
    if args.dht_prefix is not None:
        kwargs["dht_prefix"] = args.dht_prefix
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, **kwargs)
    input_ids = torch.tensor([[int(token) for token in args.input_ids.split(",")]])
    with torch.inference_mode():
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        last_logits = model(input_ids).logits[0, -1]
    result = {"output_ids": output[0].tolist(), "last_logits": last_logits.tolist()}
    if args.backward:
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]).backward()
        result["embeds_grad"] = embeds.grad[0].tolist()
    print(json.dumps(result), flush=True)
    # The result is out; should shutting down hang, show where (stderr) and exit rather than block the test.
    faulthandler.dump_traceback_later(30, exit=True)


if __name__ == "__main__":
    main()
    # Skip the interpreter's last collections over every torch/transformers object (seconds on 2 cores).
    gc.freeze()
