"""`pollinate-engine generate`: run a prompt through the swarm and print tokens as they arrive."""

from __future__ import annotations

import argparse
import sys


def add_commands(subparsers) -> None:
    """Add the client's subcommands to the engine's argparse subparsers."""
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a model served by the swarm",
        description="Generate text with a model served by the swarm, printing tokens as they come.",
    )
    parser.add_argument("model", help="hub id (owner/name) or local checkpoint folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="MULTIADDR", help="peers already in the swarm"
    )
    parser.add_argument("--dht-prefix", default=None, help="DHT prefix of the model (default: from its name)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace, out=None) -> int:
    """Handler of `generate`; returns the process exit code."""
    import torch

    from engine.client.model import DistributedModelForCausalLM
    from engine.client.routing import MissingBlocksError
    from engine.client.sampling import SamplingParams, streamable_text, truncate_at_stop
    from engine.models import ModelError

    out = out or sys.stdout
    try:
        model = DistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix
        )
    except (ModelError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with model:
        tokenizer = model.tokenizer
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            stop=tuple(args.stop),
            seed=args.seed,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        input_ids = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.int64)
        text = printed = ""
        try:
            for step in model.generate_stream(input_ids, params):
                text += step.text[0]
                visible = streamable_text(text, params.stop)
                out.write(visible[len(printed) :])
                out.flush()
                printed = visible
            out.write(truncate_at_stop(text, params.stop)[len(printed) :])
        except MissingBlocksError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 3
        out.write("\n")
    return 0
