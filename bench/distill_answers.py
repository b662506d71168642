"""Self-distillation data at scale: a Llama-family chat model's own greedy answers to many prompts, on CPU.

The model's greedy answers are what a drafter must predict (bench/build_ngram_table.py's n-gram table, the
feature drafter of bench/train_drafter.py). transformers' `generate` on padded batches wastes the rows that
finished early and pays its per-step overhead; this script keeps a fixed number of slots busy instead
(continuous batching): each slot holds one conversation in its own stretch of a static KV cache, a finished
answer frees its slot, and the next prompt is prefilled into it at once. One decode step reads the weights
once for all slots (q/k/v and gate/up joined into one matrix each).

Answers are written to shards under --out (default /work/data/answers/, outside git): `shard-NNNNN.jsonl.gz`,
one JSON object per line {"prompt", "prompt_ids", "answer_ids", "stop"}, and beside it
`shard-NNNNN.meta.json` (model, dtype, slots, answers/min, ...). Files appear whole (written aside, then
renamed). A second run skips the prompts the shards already answer, so the generator is resumable.
The format is described in /work/notes/14g-data-format.md.

    nice -n 10 python bench/distill_answers.py [--slots 64] [--dtype bfloat16] [--new-tokens 192]
    python bench/distill_answers.py --check 10      # answers vs unbatched float32 transformers greedy
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_OUT = Path("/work/data/answers")
FORMAT = 1


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as one user turn of the model's chat template, ready for the answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text)["input_ids"]


class SlotDecoder:
    """Greedy decoding of up to `slots` conversations at once, each at its own position in a static cache.

    A plain Llama forward (RMSNorm, RoPE, grouped-query attention, SiLU MLP) over the weights of a loaded
    transformers Llama model; it reads the modules' weights, never their forward, so it stays one job:
    many greedy answers fast."""

    def __init__(self, hf, slots: int, max_len: int, dtype: torch.dtype):
        config = hf.config
        self.dtype = dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.layers = []
        for layer in hf.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                dict(
                    norm1=layer.input_layernorm.weight.detach().to(dtype),
                    qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                    .detach()
                    .to(dtype),
                    o=attn.o_proj.weight.detach().to(dtype),
                    norm2=layer.post_attention_layernorm.weight.detach().to(dtype),
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().to(dtype),
                    down=mlp.down_proj.weight.detach().to(dtype),
                )
            )
        self.embed = hf.model.embed_tokens.weight.detach().to(dtype)
        self.final_norm = hf.model.norm.weight.detach().to(dtype)
        self.head = hf.lm_head.weight.detach().to(dtype)
        theta = (
            config.rope_parameters["rope_theta"]
            if getattr(config, "rope_parameters", None)
            else config.rope_theta
        )
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        angles = torch.cat([angles, angles], -1)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.max_len = max_len
        # the last decoder layer's outputs (before the final norm) of the last prefill [T, d] or step [B, d]:
        # the feature drafter's inputs (bench/train_drafter.py)
        self.features = torch.empty(0)

    def _norm(self, x, weight):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(self.dtype) * weight

    def _rope(self, x, positions):
        cos, sin = self.cos[positions].unsqueeze(-3), self.sin[positions].unsqueeze(-3)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _layers(self, x, positions, attend):
        """x [B, T, d] at `positions` [B, T]; `attend(index, q, k, v)` stores k/v and returns attention."""
        b, t, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer["norm1"]) @ layer["qkv"].T
            q = h[..., :q_size].view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = h[..., q_size : q_size + kv_size].view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = h[..., q_size + kv_size :].view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            out = attend(index, q, k, v).transpose(1, 2).reshape(b, t, q_size)
            x = x + out @ layer["o"].T
            gate, up = (self._norm(x, layer["norm2"]) @ layer["gate_up"].T).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ layer["down"].T
        return x

    def _logits(self, x):
        return self._norm(x, self.final_norm) @ self.head.T

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], every: bool = False):
        """Put a new conversation into `slot`; returns its first greedy token (every position's greedy token
        if `every`: teacher forcing)."""
        if len(ids) >= self.max_len:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit the cache of {self.max_len}")
        t = len(ids)
        x = self.embed[torch.tensor([ids])]
        positions = torch.arange(t)[None]

        def attend(index, q, k, v):
            self.keys[index, slot, :, :t] = k[0]
            self.values[index, slot, :, :t] = v[0]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        x = self._layers(x, positions, attend)
        self.lengths[slot] = t
        self.features = x[0]
        if every:
            return self._logits(x[0]).argmax(-1).tolist()
        return int(self._logits(x[:, -1]).argmax(-1))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for every slot (each at its own position); returns every slot's next greedy token.
        Idle slots compute too (cheaper than reshaping the cache); their output is ignored."""
        slots = torch.arange(len(tokens))
        positions = self.lengths.clamp(max=self.max_len - 1)
        span = int(positions.max()) + 1
        mask = (torch.arange(span)[None, :] <= positions[:, None])[:, None, None, :]
        x = self.embed[tokens][:, None]

        # each slot's new key/value row goes in with one index_copy_ per layer (advanced-index assignment
        # into the 5-d cache was ~10 ms a call); rows of the flat view are (slot, kv head, position)
        heads = torch.arange(self.kv_heads)
        rows = (
            (slots[:, None] * self.kv_heads + heads[None, :]) * self.max_len + positions[:, None]
        ).reshape(-1)
        group = self.heads // self.kv_heads
        scale = self.head_dim**-0.5
        hidden = ~mask.view(len(tokens), 1, 1, span)

        def attend(index, q, k, v):
            flat = (-1, self.head_dim)
            self.keys[index].view(flat).index_copy_(0, rows, k.reshape(flat))
            self.values[index].view(flat).index_copy_(0, rows, v.reshape(flat))
            keys, values = self.keys[index, :, :, :span], self.values[index, :, :, :span]
            # grouped-query attention as two batched products (the query heads of a kv head side by side)
            scores = q.reshape(len(tokens), self.kv_heads, group, self.head_dim) @ keys.transpose(-1, -2)
            scores = (scores.float() * scale).masked_fill(hidden, float("-inf"))
            out = scores.softmax(-1).to(self.dtype) @ values
            return out.reshape(len(tokens), self.heads, 1, self.head_dim)

        x = self._layers(x, positions[:, None], attend)
        self.lengths += 1
        self.features = x[:, 0]
        return self._logits(x[:, 0]).argmax(-1)


@torch.inference_mode()
def generate_all(decoder: SlotDecoder, prompts, eos: int, new_tokens: int, on_answer, features=False) -> None:
    """Greedy answers to `prompts` [(key, prompt_ids)], up to eos (kept) or `new_tokens`, keeping every slot
    busy; `on_answer(key, answer_ids, stop, rows)` gets each as it finishes. With `features`, rows holds
    the last decoder layer's output (float16) at every position read: [len(prompt) + len(answer) - 1, d]
    (the last answer token is never read); else None."""
    pending = list(prompts)[::-1]
    slots = len(decoder.lengths)
    owner: list = [None] * slots
    answers: list[list[int]] = [[] for _ in range(slots)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(slots)]
    tokens = torch.full((slots,), eos, dtype=torch.long)

    def finish(slot, stop):
        kept = torch.cat(rows[slot]) if features else None
        on_answer(owner[slot], answers[slot], stop, kept)
        owner[slot], rows[slot] = None, []

    while True:
        for slot in range(slots):
            while owner[slot] is None and pending:
                key, ids = pending.pop()
                if len(ids) + new_tokens > decoder.max_len:
                    continue
                owner[slot], answers[slot] = key, [decoder.prefill(slot, ids)]
                if features:
                    rows[slot] = [decoder.features.to(torch.float16)]
                tokens[slot] = answers[slot][0]
                if answers[slot][0] == eos or new_tokens == 1:
                    finish(slot, "eos" if answers[slot][0] == eos else "length")
        if all(o is None for o in owner):
            return
        tokens = decoder.step(tokens)
        if features:
            stepped = decoder.features.to(torch.float16)
        for slot in range(slots):
            if owner[slot] is None:
                continue
            answers[slot].append(int(tokens[slot]))
            if features:
                rows[slot].append(stepped[slot : slot + 1].clone())
            stop = (
                "eos" if answers[slot][-1] == eos else "length" if len(answers[slot]) >= new_tokens else None
            )
            if stop:
                finish(slot, stop)


def answered_prompts(out: Path) -> set[str]:
    """The prompts the shards in `out` already answer."""
    done = set()
    for shard in sorted(out.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as file:
            done.update(json.loads(line)["prompt"] for line in file)
    return done


def write_atomically(path: Path, data: bytes) -> None:
    aside = path.with_name(path.name + ".part")
    aside.write_bytes(data)
    aside.replace(path)


class ShardWriter:
    """Collects answers and writes a shard of `size` answers (and its metadata) whenever one is full."""

    def __init__(self, out: Path, size: int, meta: dict, worker: tuple[int, int] = (0, 1)):
        self.out, self.size, self.meta = out, size, meta
        self.worker = worker  # (i, n): this writer's shard numbers are i modulo n, so n workers never clash
        self.rows: list[dict] = []
        self.features: list[torch.Tensor | None] = []
        self.began = time.time()
        self.total = 0
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict, features: torch.Tensor | None = None) -> None:
        self.rows.append(row)
        self.features.append(features)
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        numbers = [int(p.name.split("-")[1].split(".")[0]) for p in self.out.glob("shard-*.jsonl.gz")]
        number = max(numbers, default=-1) + 1
        number += (self.worker[0] - number) % self.worker[1]
        name = f"shard-{number:05d}"
        now = time.time()
        minutes = (now - self.began) / 60
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.rows)
        if any(f is not None for f in self.features):  # written first: a shard's jsonl comes last
            aside = self.out / f"{name}.features.pt.part"
            torch.save(self.features, aside)
            aside.replace(self.out / f"{name}.features.pt")
        meta = dict(
            self.meta,
            format=FORMAT,
            answers=len(self.rows),
            answer_tokens=sum(len(r["answer_ids"]) for r in self.rows),
            stopped_at_eos=sum(r["stop"] == "eos" for r in self.rows),
            seconds=round(now - self.began, 1),
            answers_per_min=round(len(self.rows) / max(minutes, 1e-9), 2),
            finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            load_average=[round(x, 2) for x in os.getloadavg()],
        )
        write_atomically(self.out / f"{name}.meta.json", json.dumps(meta, indent=1).encode())
        write_atomically(self.out / f"{name}.jsonl.gz", gzip.compress(body.encode()))
        self.total += len(self.rows)
        print(
            f"{name}: {len(self.rows)} answers, {meta['answers_per_min']} answers/min, "
            f"load {meta['load_average'][0]}, {self.total} this run",
            flush=True,
        )
        self.rows, self.features, self.began = [], [], now


def load_model(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from engine.smollm2 import ensure_smollm2

        path = Path(ensure_smollm2())
    else:
        path = Path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return path, tokenizer, hf


def check(args) -> int:
    """Token match of this script's answers (its dtype and slots) against unbatched float32 transformers."""
    from bench.drafter_prompts import HELD_OUT

    _, tokenizer, reference = load_model(args.model, torch.float32)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [(p, chat_ids(tokenizer, p)) for p in HELD_OUT[: args.check]]
    decoder = SlotDecoder(reference, args.slots, args.max_len, getattr(torch, args.dtype))
    ours: dict[str, list[int]] = {}
    began = time.perf_counter()
    generate_all(
        decoder, prompts, eos, args.new_tokens, lambda key, answer, stop, _: ours.update({key: answer})
    )
    took = time.perf_counter() - began
    same = total = prefix = forced = 0
    for prompt, ids in prompts:
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=eos
            )
        want = out[0, len(ids) :].tolist()
        got = ours[prompt]
        # teacher-forced on float32's answer: does this decoder pick float32's token at each position?
        picks = decoder.prefill(0, ids + want[:-1], every=True)[len(ids) - 1 :]
        forced += sum(a == b for a, b in zip(picks, want, strict=True))
        pairs = enumerate(zip(want, got, strict=False))
        agree = next((i for i, (a, b) in pairs if a != b), min(len(want), len(got)))
        prefix += agree
        same += sum(a == b for a, b in zip(want, got, strict=False))
        total += len(want)
        print(f"{agree:>4}/{len(want):<4} same prefix  {prompt[:60]}")
    print(
        f"{args.dtype}, {args.slots} slots: {len(prompts)} answers in {took:.0f} s; identical prefix "
        f"{prefix / total:.0%} of float32 transformers' tokens, same token at the same place "
        f"{same / total:.0%}; "
        f"teacher-forced on float32's answers, the same next token at {forced / total:.1%} of positions"
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 or a Llama-family checkpoint folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--max-len", type=int, default=320, help="cache length per slot (prompt + answer)")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="answer at most this many new prompts")
    parser.add_argument("--worker", default="0/1", help="i/n: answer every n-th prompt from the i-th")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1: under load, 2 threads spent most of a step waiting for each other",
    )
    parser.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write each answer's last-layer outputs (float16) to shard-N.features.pt",
    )
    parser.add_argument(
        "--prompts",
        default="pool",
        choices=("pool", "measure"),
        help="pool: drafter_prompts.distill_prompts() (training); measure: measure_prompts() (held out)",
    )
    parser.add_argument("--check", type=int, default=0, help="compare N held-out answers with float32")
    args = parser.parse_args(argv)
    index, workers = (int(x) for x in args.worker.split("/"))
    if not 0 <= index < workers:
        parser.error(f"--worker {args.worker}: want i/n with 0 <= i < n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check:
        return check(args)

    from bench.drafter_prompts import distill_prompts, measure_prompts

    # a kill (SIGTERM) unwinds like Ctrl-C, so the answers of the shard being filled are written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    path, tokenizer, hf = load_model(args.model, torch.float32)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    done = answered_prompts(args.out)
    pool = distill_prompts() if args.prompts == "pool" else measure_prompts()
    index, workers = (int(x) for x in args.worker.split("/"))
    todo = [p for p in pool if p not in done][index::workers][: args.limit]
    print(f"{len(done)} prompts answered in {args.out}; {len(todo)} to go", flush=True)
    decoder = SlotDecoder(hf, args.slots, args.max_len, getattr(torch, args.dtype))
    del hf
    writer = ShardWriter(
        args.out,
        args.shard_size,
        dict(
            model=path.name,
            dtype=args.dtype,
            slots=args.slots,
            new_tokens=args.new_tokens,
            made_by="bench/distill_answers.py",
            prompts=args.prompts,
            features=args.features,
            eos=eos,
            worker=args.worker,
        ),
        worker=(index, workers),
    )
    ids = {}

    def keep(prompt, answer, stop, rows):
        writer.add(dict(prompt=prompt, prompt_ids=ids.pop(prompt), answer_ids=answer, stop=stop), rows)

    def feed():
        for prompt in todo:
            ids[prompt] = chat_ids(tokenizer, prompt)
            yield prompt, ids[prompt]

    try:
        generate_all(decoder, list(feed()), eos, args.new_tokens, keep, features=args.features)
    finally:
        writer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
