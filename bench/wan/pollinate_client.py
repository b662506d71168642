"""Timed greedy generations by Pollinate's client, for bench/wan.py (run as a subprocess of our venv).

    python bench/wan/pollinate_client.py MODEL --initial-peers ADDR.. --dht-prefix P --input-ids 1,2,3
        --new-tokens N --repeats R [--no-push] [--speculate] [--max-draft K] [--draft-blocks N]
        [--rows JSON]

One warm-up generation, then R timed ones, each in a fresh inference session. Prints one JSON line:
{"runs": [{"ttft": s, "step_s": s, "tokens": [...]}, ...], "speculation": {...} or null}.

With --rows '[{"key": "c-push"}, {"key": "c-spec", "speculate": true}, ...]' (each row's options as in the
flags: no_push, speculate, draft_blocks; feature_drafter: "auto" or a drafter folder; ngram_table, tree_rows,
tree_cost as in SpeculationConfig; ngram_rule: the shipped table's chains with NgramDrafter's table_first),
the rows share this process and its connections and take turns: a warm-up of each, then R rounds with one
timed generation of each row, the order rotating every round, so that the machine's other load falls on
every row alike.
Prints {"rows": {key: {"runs": ..., "speculation": ...}}}.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from client_args import input_ids, swarm_parser  # this folder (the script's)

from engine.client.model import DistributedModelForCausalLM
from engine.client.sequence_manager import ClientConfig
from engine.client.speculative import SpeculationConfig, SpeculationStats


def speculation_for(row: dict, max_draft: int, drafter=None) -> SpeculationConfig | None:
    if not row.get("speculate"):
        return None
    return SpeculationConfig(
        drafter=drafter,  # None: the model picks, from the options below
        max_draft=max_draft,
        initial_draft=min(4, max_draft),
        draft_blocks=int(row.get("draft_blocks", 0)),
        feature_drafter=row.get("feature_drafter"),  # None: prompt lookup, not the shipped drafter
        ngram_table=row.get("ngram_table"),  # None: prompt lookup, not the shipped table
        tree_rows=int(row.get("tree_rows", 0)),  # chains only unless the row asks for token trees
        tree_cost=row.get("tree_cost", "measured"),
    )


def ngram_drafter_for(row: dict, model, name: str):
    """The shipped table's chain drafter with another rule for when the table goes before a 1-token copy
    (row option ngram_rule: NgramDrafter's table_first), built as the client builds its own; None for rows
    without one."""
    if not row.get("ngram_rule"):
        return None
    from engine.client.ngram_drafter import NgramDrafter, NgramTable, shipped_table_path

    table = NgramTable.load(shipped_table_path(name), model.head.lm_head.weight.shape[0])
    return NgramDrafter(table, SpeculationConfig.max_ngram, 2, table_first=row["ngram_rule"])


def timed_generation(model, ids, new_tokens: int, speculation, stats: SpeculationStats) -> dict:
    """One greedy generation: time to the first token, mean seconds per later token, the tokens."""
    started = time.perf_counter()
    times, tokens = [], []
    for step in model.generate_stream(
        ids, max_new_tokens=new_tokens, eos_token_id=None, speculation=speculation, stats=stats
    ):
        times.append(time.perf_counter())
        tokens.append(int(step.tokens[0]))
    step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return dict(ttft=times[0] - started, step_s=step_s, tokens=tokens)


def main() -> None:
    parser = swarm_parser()
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--no-push", action="store_true", help="do not ask servers to push to each other")
    parser.add_argument("--speculate", action="store_true", help="speculative decoding (prompt lookup)")
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument(
        "--draft-blocks", type=int, default=0, help="with --speculate: draft with the first N blocks here"
    )
    parser.add_argument("--rows", default=None, help="JSON list of rows taking turns (see the docstring)")
    args = parser.parse_args()

    ids = torch.tensor(input_ids(args))
    if args.rows is None:
        single = dict(key="", no_push=args.no_push, speculate=args.speculate, draft_blocks=args.draft_blocks)
        rows = [single]
    else:
        rows = json.loads(args.rows)
    base = ClientConfig(request_timeout=60.0)
    results = {row["key"]: dict(runs=[], stats=SpeculationStats()) for row in rows}
    with DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, client_config=base
    ) as model:
        drafters = {row["key"]: ngram_drafter_for(row, model, Path(args.model).name) for row in rows}

        def generate(row: dict, stats: SpeculationStats) -> dict:
            model.manager.config = dataclasses.replace(base, server_to_server=not row.get("no_push"))
            speculation = speculation_for(row, args.max_draft, drafters[row["key"]])
            return timed_generation(model, ids, args.new_tokens, speculation, stats)

        for row in rows:  # warm-up, not counted
            generate(row, SpeculationStats())
        for repeat in range(args.repeats):
            turn = repeat % len(rows)
            for row in rows[turn:] + rows[:turn]:
                result = results[row["key"]]
                result["runs"].append(generate(row, result["stats"]))

    def report(row: dict) -> dict:
        result = results[row["key"]]
        speculation = result["stats"].as_dict() if row.get("speculate") else None
        return dict(runs=result["runs"], speculation=speculation)

    if args.rows is None:
        print(json.dumps(report(rows[0])), flush=True)
    else:
        print(json.dumps(dict(rows={row["key"]: report(row) for row in rows})), flush=True)


if __name__ == "__main__":
    main()
