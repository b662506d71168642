"""Drafting from a table of what the model itself says next: an n-gram datastore distilled from its answers.

Prompt lookup only drafts what the conversation already contains, so on an ordinary question it is right
about one time in ten. A model's own answers, though, repeat its habits ("In summary,", "a data structure
that", "is a"), and a table of which token the model chose after each run of 1-3 tokens in many of its
greedy answers predicts its next choice far more often (the idea of retrieval-based speculative decoding,
He et al. 2023, with the model's own greedy answers as the datastore). The table is built offline from
answers to training prompts (bench/build_ngram_table.py) and shipped per model; a run's verification keeps
the output exactly the model's, so a table for another model only costs acceptance (a table whose
vocabulary size differs is refused).

Each proposal is prompt lookup's copy when the conversation has a match of >= 2 tokens (input-grounded
answers copy), else a chain from the table (longest known context first, 3 tokens down to 1) when the table
is fairly sure of its first token, else a copy after a 1-token match, else the table's unsure chain. Its
kind, which gets its own draft length, is the context length and whether the table is sure of the first
token, so unsure proposals stop costing once they prove useless.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.client.speculative import prompt_lookup_match

FORMAT = 1
MAX_CONTEXT = 3
TABLE_FILE = "ngram.json.gz"
SURE = 0.6  # a context whose favourite took this share of its continuations drafts before a 1-token copy
UNSURE = 0.3  # a chain stops at a 1-token context whose favourite took less
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "resources" / "ngram"


class NgramTableError(ValueError):
    """A table file that cannot be used (unreadable, another format, another vocabulary)."""


@dataclass(frozen=True)
class Guess:
    token: int
    context: int  # how many tokens of context matched (1..MAX_CONTEXT)
    share: float  # the share of that context's continuations that were this token


class NgramTable:
    """For each context of 1..MAX_CONTEXT tokens, the token the model most often chose next, and how often."""

    def __init__(self, entries: dict[tuple[int, ...], tuple[int, int, int]], vocab_size: int, meta: dict):
        self.entries = entries  # context -> (next token, its count, the context's count)
        self.vocab_size = vocab_size
        self.meta = meta

    @classmethod
    def build(
        cls, answers: Iterable[tuple[Sequence[int], int]], vocab_size: int, min_count: int = 1, **meta
    ) -> NgramTable:
        """From (tokens, prompt_length) pairs: every answer position counts its context's next token (the
        prompt's tokens are context only: the user wrote them, not the model)."""
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        answered = 0
        for tokens, prompt_length in answers:
            tokens = list(tokens)
            for i in range(max(prompt_length, 1), len(tokens)):
                answered += 1
                for n in range(1, min(MAX_CONTEXT, i) + 1):
                    counts[tuple(tokens[i - n : i])][tokens[i]] += 1
        entries = {}
        for context, followers in counts.items():
            token, count = followers.most_common(1)[0]
            if count >= min_count:
                entries[context] = (token, count, sum(followers.values()))
        return cls(entries, vocab_size, dict(meta, answer_tokens=answered))

    def guess(self, history: Sequence[int]) -> Guess | None:
        """The model's likeliest next token after `history`, from the longest context the table knows."""
        for n in range(min(MAX_CONTEXT, len(history)), 0, -1):
            entry = self.entries.get(tuple(history[len(history) - n :]))
            if entry is not None:
                token, count, total = entry
                return Guess(token, n, count / total)
        return None

    def save(self, path: Path) -> None:
        rows = [[*context, token, count, total] for context, (token, count, total) in self.entries.items()]
        rows.sort()
        body = dict(format=FORMAT, vocab_size=self.vocab_size, meta=self.meta, rows=rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as file:
            json.dump(body, file, separators=(",", ":"))

    @classmethod
    def load(cls, path: Path, vocab_size: int | None = None) -> NgramTable:
        try:
            with gzip.open(path, "rt", encoding="utf-8") as file:
                body = json.load(file)
        except (OSError, ValueError) as error:
            raise NgramTableError(f"cannot read the n-gram table {path}: {error}") from error
        if body.get("format") != FORMAT:
            raise NgramTableError(f"{path} is an n-gram table of format {body.get('format')}, not {FORMAT}")
        if vocab_size is not None and body["vocab_size"] != vocab_size:
            raise NgramTableError(
                f"{path} was built for a vocabulary of {body['vocab_size']} tokens, "
                f"this model has {vocab_size}"
            )
        entries = {tuple(row[:-3]): (row[-3], row[-2], row[-1]) for row in body["rows"]}
        return cls(entries, body["vocab_size"], body.get("meta", {}))


def shipped_table_path(*names: str | None, root: Path = SHIPPED_DIR) -> Path | None:
    """The table shipped for a model known by any of `names` (folder name, dht prefix, hub id), or None."""
    for name in names:
        if not name:
            continue
        simple = str(name).rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-hf")
        path = root / simple / TABLE_FILE
        if path.is_file():
            return path
    return None


class NgramDrafter:
    """Prompt lookup's copy after a match of >= lookup_min_match tokens, else a chain from the table."""

    name = "ngram"

    def __init__(self, table: NgramTable, max_ngram: int = 3, lookup_min_match: int = 2):
        self.table = table
        self.max_ngram = max_ngram
        self.lookup_min_match = lookup_min_match

    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], None]:
        return self.propose(history, k)[:2]

    def propose(self, history: Sequence[int], k: int) -> tuple[list[int], None, tuple]:
        copy, matched = prompt_lookup_match(history, k, self.max_ngram)
        if matched >= self.lookup_min_match:
            return copy, None, ("lookup", matched)
        draft, first = self._chain(history, k)
        if first is not None and (first.context >= 2 or first.share >= SURE):
            return draft, None, ("ngram", first.context, first.share >= SURE)
        if copy:  # a 1-token match: copying beats an unsure guess on input-grounded answers
            return copy, None, ("lookup", matched)
        if first is None:
            return [], None, ("ngram", 0, False)
        return draft, None, ("ngram", first.context, False)

    def _chain(self, history: Sequence[int], k: int) -> tuple[list[int], Guess | None]:
        """Up to k guesses, each after the ones before; it stops at a context the table has not seen, and
        after the first token at an unsure guess (one short context, no clear favourite)."""
        tokens, draft, first = list(history), [], None
        while len(draft) < k:
            guess = self.table.guess(tokens)
            if guess is None or (first is not None and guess.context == 1 and guess.share < UNSURE):
                break
            first = first or guess
            draft.append(guess.token)
            tokens.append(guess.token)
        return draft, first
