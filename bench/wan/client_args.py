"""The command line that bench/wan.py's client scripts share (petals_client.py, pollinate_client.py,
round_client.py): the model folder, the swarm to join, the prompt and the repeats.

Plain argparse only: the Petals venv's client imports it too. The scripts run as `python bench/wan/X.py`, so
this folder is on their path.
"""

from __future__ import annotations

import argparse


def swarm_parser(repeats: int = 3) -> argparse.ArgumentParser:
    """MODEL --initial-peers ADDR.. --dht-prefix P --input-ids 1,2,3 [--repeats R]; callers add their own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument("--input-ids", required=True, help="the prompt's token ids, comma-separated")
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def input_ids(args: argparse.Namespace) -> list[list[int]]:
    """The prompt as a batch of one, for torch.tensor."""
    return [[int(token) for token in args.input_ids.split(",")]]
