"""Replay the client's speculative loop over known greedy answers, with each round's time taken from a cost
curve: policy choices compared in seconds, without a swarm.

    python bench/spec_replay.py [--answers DIR] [--wan-answers FILE] [--new-tokens 32]
        [--stairs 181 184 209 216 227 241 243 244] [--table PATH]
        [--rows chain-sure chain-known tree tree-line lookup]

The real `generate` runs with the real drafters (the n-gram table shipped for SmolLM2, or --table; prompt
lookup) against a stand-in model that answers every row with the known greedy answer's next token (a row
off that answer gets a token no drafter proposes), so a round keeps exactly what the servers' model would.
Each step of k rows advances a fake clock by --stairs[k - 1] ms (rows past the list: its last step per row
more), which is all that `RoundCost`, `DraftLength` and the tree builder learn from. Greedy output is
checked equal to the answer. Answers: distill_answers.py's float32 shards (--answers; each answer is one
generation, the drafters' calibration kept across them like a long-lived client), and wan.py's prompts
(--wan-answers: {"name": [prompt_and_answer_ids, prompt_length]}; a warm-up and 3 timed generations each in a
fresh calibration, as the bench's client process does). Prints tokens per round and ms per token per row.

Rows: chain-sure / chain-known (n-gram chains, NgramDrafter table_first), tree / tree-line (n-gram + prompt
lookup trees, SpeculationConfig.tree_cost "measured" / "line"), lookup (prompt lookup chains). The default
stairs are 14i's whole WAN rounds (bench/round_cost.py --wan, 4 servers x 25 ms): re-measure them when the
servers' kernels change. A replay is as good as its cost curve and answers: it ranks policies; the WAN
bench (bench/wan.py) measures them.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import engine.client.speculative as speculative
from engine.client.draft_tree import Calibration, NgramTreeDrafter
from engine.client.generation import generate
from engine.client.ngram_drafter import NgramDrafter, NgramTable, shipped_table_path
from engine.client.sampling import SamplingParams

STAIRS_MS = (181, 184, 209, 216, 227, 241, 243, 244)  # 1-8 rows, 14i's WAN rounds (bench/README)
MODEL = "SmolLM2-135M-Instruct"
DATA = Path("/work/data")  # distill_answers.py's float32 measure shards and the WAN prompts' answers


class FakeClock:
    """Stands in for speculative.py's `time` while a replay runs: perf_counter() reads seconds advanced by
    the steps."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@contextlib.contextmanager
def fake_clock() -> Iterator[FakeClock]:
    clock = FakeClock()
    real = speculative.time
    speculative.time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    try:
        yield clock
    finally:
        speculative.time = real


def step_seconds(rows: int, stairs_ms: tuple[float, ...]) -> float:
    """A step of `rows` rows on the cost curve (past its end, its last step per row more)."""
    if rows <= len(stairs_ms):
        return stairs_ms[rows - 1] / 1e3
    last_step = stairs_ms[-1] - stairs_ms[-2] if len(stairs_ms) > 1 else 0.0
    return (stairs_ms[-1] + (rows - len(stairs_ms)) * last_step) / 1e3


class _Session:
    def __init__(self, max_length: int):
        self.tokens: list[int] = []
        self.tree: int | None = None  # where the last step's tree starts
        self.max_length = max_length
        self.output_ids = None

    @property
    def position(self) -> int:
        return len(self.tokens)

    def close(self):
        pass


class AnswerModel:
    """A model whose greedy choice after any context on `sequence`'s path is the sequence's next token (off
    it, token vocab - 1): rolls back, takes trees, and advances `clock` by each decode step's cost."""

    def __init__(self, sequence: list[int], vocab: int, clock: FakeClock, cost: Callable[[int], float]):
        self.sequence, self.vocab, self.clock, self.cost = sequence, vocab, clock, cost

    def inference_session(self, *, max_length: int) -> _Session:
        return _Session(max_length)

    def _next(self, context: list[int]) -> int:
        n = len(context)
        return self.sequence[n] if n < len(self.sequence) and context == self.sequence[:n] else self.vocab - 1

    def session_logits(self, session, input_ids):
        return self.session_logits_all(session, input_ids)[:, -1]

    def session_logits_all(
        self, session, input_ids, *, start_from_position=None, last=None, tree_parents=None
    ):
        if start_from_position is not None:
            del session.tokens[start_from_position:]
        ids = input_ids[0].tolist()
        parents = list(tree_parents or [])
        chain = len(ids) - len(parents)
        before = session.tokens + ids[:chain]
        choices = [self._next(before[: len(session.tokens) + i + 1]) for i in range(chain)]
        for row in range(len(parents)):
            path, r = [], row
            while r >= 0:
                path, r = [r, *path], parents[r]
            choices.append(self._next(before + [ids[chain + j] for j in path]))
        session.tree = len(before) if parents else None
        session.tokens = before + ids[chain:]
        if session.position > len(ids):  # the prompt's prefill is not a round
            self.clock.now += self.cost(len(ids))
        logits = torch.full((1, len(choices), self.vocab), -1e4)
        logits[0, range(len(choices)), choices] = 0.0
        return logits if last is None else logits[:, -last:]

    def can_roll_back(self, session) -> bool:
        return True

    def can_take_trees(self, session) -> bool:
        return True

    def accept_tree(self, session, path):
        base = session.tree
        session.tokens = session.tokens[:base] + [session.tokens[base + r] for r in path]
        session.tree = None


def _drafter_rows(table: NgramTable) -> dict[str, tuple[Callable[[Calibration], object], dict]]:
    """Row name -> (a fresh drafter given the calibration to share, SpeculationConfig options)."""

    def tree(calibration):
        return NgramTreeDrafter(NgramDrafter(table, 3, 2), table, 3, calibration=calibration)

    return {
        "chain-sure": (lambda _: NgramDrafter(table, 3, 2, table_first="sure"), dict(tree_rows=0)),
        "chain-known": (lambda _: NgramDrafter(table, 3, 2, table_first="known"), dict(tree_rows=0)),
        "tree": (tree, dict(tree_cost="measured")),
        "tree-line": (tree, dict(tree_cost="line")),
        "lookup": (lambda _: speculative.PromptLookupDrafter(3), dict(tree_rows=0)),
    }


def replay(
    make: Callable[[Calibration], object],
    options: dict,
    answers: list[tuple[list[int], list[int]]],
    *,
    vocab: int,
    new_tokens: int,
    stairs_ms: tuple[float, ...],
    warmups: int = 0,
) -> tuple[int, int, float]:
    """(rounds, tokens, seconds) over the answers after the first `warmups`, one calibration for all. As in
    the bench, the prompt's round counts as a round, and the seconds are those after the first token (the
    prompt's round is not on the clock)."""
    calibration = Calibration()
    rounds = tokens = 0
    seconds = 0.0
    with fake_clock() as clock:
        for index, (prompt, answer) in enumerate(answers):
            clock.now = 0.0
            stats = speculative.SpeculationStats()
            model = AnswerModel(prompt + answer, vocab, clock, lambda rows: step_seconds(rows, stairs_ms))
            config = speculative.SpeculationConfig(drafter=make(calibration), **options)
            params = SamplingParams(max_new_tokens=new_tokens)
            output = generate(model, torch.tensor([prompt]), params, speculation=config, stats=stats)
            if output[0, len(prompt) :].tolist() != answer[:new_tokens]:
                raise AssertionError("speculation changed the greedy tokens: a bug in the loop or the replay")
            if index >= warmups:
                rounds, tokens, seconds = rounds + stats.rounds, tokens + new_tokens, seconds + clock.now
    return rounds, tokens, seconds


def load_answers(folder: Path, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    answers = []
    for shard in sorted(folder.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt") as lines:
            for line in lines:
                record = json.loads(line)
                answers.append((record["prompt_ids"], record["answer_ids"]))
    return [(p, a) for p, a in answers if len(a) >= new_tokens]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=Path, default=Path("/work/data/answers-measure"))
    parser.add_argument(
        "--wan-answers", type=Path, default=Path("/work/data/answers-wan/wan-answers-192.json")
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--stairs", type=float, nargs="+", default=list(STAIRS_MS), help="ms of 1, 2, .. rows"
    )
    parser.add_argument("--table", type=Path, default=None, help="an n-gram table (default: SmolLM2's)")
    parser.add_argument("--rows", nargs="+", default=["chain-sure", "chain-known", "tree", "tree-line"])
    args = parser.parse_args(argv)

    table_path = args.table or shipped_table_path(MODEL)
    if table_path is None:
        parser.error(f"no n-gram table is shipped for {MODEL}: name one with --table")
    table = NgramTable.load(table_path)
    rows = _drafter_rows(table)
    unknown = [row for row in args.rows if row not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(rows)}")
    sets: dict[str, tuple[list, int]] = {}
    if args.answers.is_dir():
        held = load_answers(args.answers, args.new_tokens)
        if held:
            sets[f"{args.answers.name} ({len(held)})"] = (held, 0)
    if args.wan_answers.is_file():
        for name, (ids, prompt_length) in json.loads(args.wan_answers.read_text()).items():
            if len(ids) - prompt_length >= args.new_tokens:
                sets[name] = ([(ids[:prompt_length], ids[prompt_length:])] * 4, 1)
    if not sets:
        parser.error(f"no answers of {args.new_tokens}+ tokens in {args.answers} or {args.wan_answers}")

    stairs = tuple(args.stairs)
    print(f"{args.new_tokens} new tokens; step ms by rows: {' '.join(f'{s:g}' for s in stairs)}")
    print(f"{'row':12} " + " ".join(f"{name:>26}" for name in sets))
    print(f"{'':12} " + " ".join(f"{'tok/round  ms/token':>26}" for _ in sets))
    for row in args.rows:
        make, options = rows[row]
        cells = []
        for answers, warmups in sets.values():
            rounds, tokens, seconds = replay(
                make, options, answers, vocab=table.vocab_size, new_tokens=args.new_tokens, stairs_ms=stairs,
                warmups=warmups,
            )  # fmt: skip
            generations = len(answers) - warmups  # ms per token after the first, as bench/wan.py's
            cells.append(f"{tokens / rounds:>15.3f} {1e3 * seconds / (tokens - generations):>10.1f}")
        print(f"{row:12} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
