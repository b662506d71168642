"""Drafting from a table of what the model itself says next: an n-gram datastore distilled from its answers.

Prompt lookup only drafts what the conversation already contains, so on an ordinary question it is right
about one time in ten. A model's own answers, though, repeat its habits ("In summary,", "a data structure
that", "is a"), and a table of which tokens the model chose after each run of 1-4 tokens in many of its
greedy answers predicts its next choice far more often (the idea of retrieval-based speculative decoding,
He et al. 2023, with the model's own greedy answers as the datastore). The table is built offline from
answers to training prompts (bench/build_ngram_table.py) and shipped per model; a run's verification keeps
the output exactly the model's, so a table for another model only costs acceptance (a table whose
vocabulary size differs is refused).

Each proposal is prompt lookup's copy when the conversation has a match of >= 2 tokens (input-grounded
answers copy), else a chain from the table (longest known context first, 4 tokens down to 1) when it knows
a context of 2+ tokens or has a clear favourite, else a copy after a 1-token match, else the table's chain.
Its kind, which gets its own draft length, is the context length and whether the table is sure of the first
token, so unsure proposals stop costing once they prove useless. `NgramTable.candidates` gives the top few
next tokens of a context for token trees (engine/client/draft_tree.py).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.client.speculative import prompt_lookup_match

FORMAT = 2  # 2: up to TOP_K followers per context, contexts of up to 4 tokens
MAX_CONTEXT = 4
TOP_K = 4
TABLE_FILE = "ngram.json.gz"
SURE = 0.6  # a context whose favourite took this share of its continuations drafts before a 1-token copy
UNSURE = 0.3  # a chain stops at a 1-token context whose favourite took less
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "resources" / "ngram"


class NgramTableError(ValueError):
    """A table file that cannot be used (unreadable, another format, another vocabulary)."""


@dataclass(frozen=True)
class Guess:
    token: int
    context: int  # how many tokens of context matched (1..the table's longest context)
    share: float  # the share of that context's continuations that were this token


Followers = tuple[tuple[int, int], ...]  # (token, count), most frequent first


class NgramTable:
    """For each context of 1..max_context tokens, the tokens the model most often chose next (its top few,
    most frequent first), with their counts and the context's own count."""

    def __init__(self, entries: dict[tuple[int, ...], tuple[Followers, int]], vocab_size: int, meta: dict):
        self.entries = entries  # context -> (followers, the context's count)
        self.vocab_size = vocab_size
        self.meta = meta
        self.max_context = max((len(context) for context in entries), default=0)

    @classmethod
    def build(
        cls,
        answers: Iterable[tuple[Sequence[int], int]],
        vocab_size: int,
        min_count: int = 1,
        *,
        top_k: int = TOP_K,
        max_context: int = MAX_CONTEXT,
        **meta,
    ) -> NgramTable:
        """From (tokens, prompt_length) pairs: every answer position counts its context's next token (the
        prompt's tokens are context only: the user wrote them, not the model). A context keeps its `top_k`
        likeliest followers; contexts seen fewer than `min_count` times are left out."""
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        answered = 0
        for tokens, prompt_length in answers:
            tokens = list(tokens)
            for i in range(max(prompt_length, 1), len(tokens)):
                answered += 1
                for n in range(1, min(max_context, i) + 1):
                    counts[tuple(tokens[i - n : i])][tokens[i]] += 1
        entries = {}
        for context, followers in counts.items():
            total = sum(followers.values())
            if total >= min_count:  # most_common keeps first-seen order among equal counts
                entries[context] = (tuple(followers.most_common(top_k)), total)
        return cls(entries, vocab_size, dict(meta, answer_tokens=answered, top_k=top_k))

    def pruned(
        self, min_counts: Sequence[int], min_share: float = 0.0, top_k: int | None = None
    ) -> NgramTable:
        """A smaller table: contexts of n tokens seen at least min_counts[n - 1] times (the last entry
        for longer ones), followers with at least `min_share` of their context (the favourite always
        stays), at most `top_k` of them."""
        entries = {}
        for context, (followers, total) in self.entries.items():
            if total < min_counts[min(len(context), len(min_counts)) - 1]:
                continue
            kept = [f for i, f in enumerate(followers[:top_k]) if i == 0 or f[1] >= min_share * total]
            entries[context] = (tuple(kept), total)
        return NgramTable(entries, self.vocab_size, dict(self.meta, pruned=dict(min_counts=list(min_counts))))

    def guess(self, history: Sequence[int]) -> Guess | None:
        """The model's likeliest next token after `history`, from the longest context the table knows."""
        for n in range(min(self.max_context, len(history)), 0, -1):
            entry = self.entries.get(tuple(history[len(history) - n :]))
            if entry is not None:
                (token, count), total = entry[0][0], entry[1]
                return Guess(token, n, count / total)
        return None

    def candidates(self, history: Sequence[int], k: int) -> list[Guess]:
        """Up to k distinct next tokens after `history`, likeliest first: the longest known context's
        followers by share, then shorter contexts' followers not listed yet (for token trees)."""
        found: list[Guess] = []
        for n in range(min(self.max_context, len(history)), 0, -1):
            entry = self.entries.get(tuple(history[len(history) - n :]))
            if entry is None:
                continue
            followers, total = entry
            for token, count in followers:
                if len(found) >= k:
                    return found
                if all(g.token != token for g in found):
                    found.append(Guess(token, n, count / total))
        return found

    def save(self, path: Path) -> None:
        """gzip JSON; a row is [context length, *context, context count, token, count, token, count, ...]."""
        rows = [
            [len(context), *context, total, *(x for follower in followers for x in follower)]
            for context, (followers, total) in self.entries.items()
        ]
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
            raise NgramTableError(
                f"{path} is an n-gram table of format {body.get('format')}, not {FORMAT}: "
                "rebuild it with bench/build_ngram_table.py"
            )
        if vocab_size is not None and body["vocab_size"] != vocab_size:
            raise NgramTableError(
                f"{path} was built for a vocabulary of {body['vocab_size']} tokens, "
                f"this model has {vocab_size}"
            )
        entries = {}
        for row in body["rows"]:
            n = row[0]
            pairs = row[n + 2 :]
            entries[tuple(row[1 : n + 1])] = (tuple(zip(pairs[::2], pairs[1::2], strict=True)), row[n + 1])
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

    def __init__(
        self, table: NgramTable, max_ngram: int = 3, lookup_min_match: int = 2, table_first: str = "known"
    ):
        """`table_first`: when the table's chain goes before a 1-token copy: "known", after any 2+-token
        context or with any clear favourite; "sure", only with a clear favourite after 2+ tokens (d284824;
        through the WAN swarm it kept fewer tokens per round on both bench prompts, bench/README eighth
        pass, so it stays for paired benches only)."""
        if table_first not in ("sure", "known"):
            raise ValueError(f"table_first must be 'sure' or 'known', not {table_first!r}")
        self.table = table
        self.max_ngram = max_ngram
        self.lookup_min_match = lookup_min_match
        self.table_first = table_first

    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], None]:
        return self.propose(history, k)[:2]

    def propose(self, history: Sequence[int], k: int) -> tuple[list[int], None, tuple]:
        copy, matched = prompt_lookup_match(history, k, self.max_ngram)
        if matched >= self.lookup_min_match:
            return copy, None, ("lookup", matched)
        draft, first = self._chain(history, k)
        # "sure" (d284824) was for the rewrite: a fixed-length replay lost 2.39 -> 2.21 tokens per round when
        # any known 2-token context went first. Through the swarm, with adaptive lengths, "known" kept more on
        # both prompts (question 1.23 vs 1.19, rewrite 2.04-2.09 vs 2.00 in two paired runs).
        sure = first is not None and first.share >= SURE
        known = first is not None and first.context >= 2
        if (known and sure) if self.table_first == "sure" else (known or sure):
            return draft, None, ("ngram", first.context, sure)
        if copy:  # a 1-token match: copying beats an unsure guess on input-grounded answers
            return copy, None, ("lookup", matched)
        if first is None:
            return [], None, ("ngram", 0, False)
        return draft, None, ("ngram", first.context, first.share >= SURE)

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
