"""Train a feature drafter (engine.client.feature_drafter, EAGLE-style) for SmolLM2 by self-distillation.

1. Data: SmolLM2's own greedy chat answers (its chat template) to the training prompts of
   bench/drafter_prompts.py, generated in batches; a hook on the last decoder layer keeps the features
   (last block's output, before the final norm) of every position read. Cached under --data (default
   tmp/data/, never committed): a second run with the same settings skips straight to training.
2. Training (fixed seed): at each position i the draft layer reads (feature_i + noise, embedding of
   token_{i+1}) and predicts feature_{i+1}: smooth L1 against the real feature, plus cross-entropy of the
   LM head (final norm + tied head) on the prediction against the model's next greedy token (answer
   positions only, over the vocabulary the answers use). A second, unrolled step reads its own prediction
   (as drafting does from the 2nd draft token on) and is trained the same way.
3. Writes the drafter (float16 safetensors + JSON) to --out, default engine/resources/drafters/<model>/.

    python bench/train_drafter.py [--model smollm2 | FOLDER] [--prompts 300] [--new-tokens 96] [--epochs 8]

bench/drafter_accept.py measures the result on held-out prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.drafter_prompts import training_prompts  # noqa: E402

SEED = 0


def model_path(name: str, data: Path) -> Path:
    if name == "smollm2":
        from engine.smollm2 import ensure_smollm2

        return Path(ensure_smollm2(data / "models"))
    return Path(name)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text)["input_ids"]


class FeatureHook:
    """Collects the last decoder layer's outputs (the features, before the final norm)."""

    def __init__(self, hf):
        self.chunks: list[torch.Tensor] = []
        self.handle = hf.model.layers[-1].register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.chunks.append(hidden.detach())

    def take(self) -> torch.Tensor:
        out, self.chunks = torch.cat(self.chunks, 1), []
        return out

    def close(self) -> None:
        self.handle.remove()


def greedy_with_features(hf, tokenizer, prompts: list[str], new_tokens: int, batch: int) -> list[dict]:
    """Each prompt's greedy answer (up to the end-of-turn token) and the features of every position read.

    Batches are padded on the left; positions come from the attention mask, so each row reads as it would
    alone (up to float rounding)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hook = FeatureHook(hf)
    records = []
    try:
        for first in range(0, len(prompts), batch):
            group = [chat_ids(tokenizer, p) for p in prompts[first : first + batch]]
            width = max(len(ids) for ids in group)
            ids = torch.tensor([[eos] * (width - len(g)) + g for g in group])
            mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
            began = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
            features = hook.take()  # [B, width + steps - 1, d]
            for row, prompt_ids in enumerate(group):
                pad = width - len(prompt_ids)
                answer = out[row, width:].tolist()
                if eos in answer:
                    answer = answer[: answer.index(eos) + 1]
                tokens = prompt_ids + answer
                records.append(
                    dict(
                        tokens=tokens,
                        prompt_length=len(prompt_ids),
                        features=features[row, pad : pad + len(tokens) - 1].to(torch.float16).clone(),
                    )
                )
            print(f"  {len(group)} answers in {time.perf_counter() - began:.0f} s", flush=True)
    finally:
        hook.close()
    return records


def load_or_make_data(
    path: Path, data: Path, prompts: list[str], new_tokens: int, batch: int, dtype: torch.dtype
) -> list[dict]:
    """The records for `prompts`, generated batch by batch; each batch is cached in `data` as it is made
    (an interrupted run keeps what it made)."""
    key = hashlib.sha256(json.dumps([path.name, new_tokens, str(dtype)]).encode()).hexdigest()[:10]
    records, hf, tokenizer = [], None, None
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        digest = hashlib.sha256(json.dumps([key, group]).encode()).hexdigest()[:12]
        cached = data / f"drafter-data-{digest}.pt"
        if not cached.exists():
            if hf is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path)
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
                print(
                    f"data: greedy answers ({dtype}) to {len(prompts)} prompts, {new_tokens} tokens at most"
                )
            made = greedy_with_features(hf, tokenizer, group, new_tokens, batch)
            data.mkdir(parents=True, exist_ok=True)
            torch.save(made, cached)
        records += torch.load(cached)
        print(f"  data: {len(records)}/{len(prompts)} sequences", flush=True)
    return records


# --- training ---


def sequence_batch(records: list[dict], head) -> dict[str, torch.Tensor]:
    """Right-padded training tensors of some sequences: at index i the inputs (feature_i, embedding of
    token_{i+1}), the step-2 embedding (token_{i+2}), the targets feature_{i+1} / feature_{i+2}, and the
    model's next tokens token_{i+2} / token_{i+3} where they are answer tokens (-1 elsewhere)."""
    width = max(len(r["tokens"]) for r in records) - 2
    d = records[0]["features"].shape[1]
    b = len(records)
    feats = torch.zeros(b, width + 1, d)
    ids = torch.zeros(b, width + 2, dtype=torch.int64)
    valid = torch.zeros(b, width + 1, dtype=torch.bool)
    answer = torch.zeros(b, width + 2, dtype=torch.bool)
    for row, r in enumerate(records):
        n = len(r["tokens"])
        feats[row, : n - 1] = r["features"].float()
        ids[row, :n] = torch.tensor(r["tokens"])
        valid[row, : n - 1] = True
        answer[row, r["prompt_length"] : n] = True
    embeds = head.embed(ids).float()
    first_ok = valid[:, 1:] & valid[:, :-1]  # feature_{i+1} exists
    second_ok = first_ok[:, 1:]  # feature_{i+2} exists
    return dict(
        features=feats[:, :-1],
        embeds=embeds[:, 1:-1],
        next_embeds=embeds[:, 2:],
        target1=feats[:, 1:],
        target2=torch.cat([feats[:, 2:], torch.zeros(b, 1, d)], 1),
        mask1=first_ok,
        mask2=torch.cat([second_ok, torch.zeros(b, 1, dtype=torch.bool)], 1),
        token1=torch.where(answer[:, 2:] & first_ok, ids[:, 2:], -1),
        token2=torch.where(
            torch.cat([answer[:, 3:] & second_ok, torch.zeros(b, 1, dtype=torch.bool)], 1),
            torch.cat([ids[:, 3:], torch.zeros(b, 1, dtype=torch.int64)], 1),
            -1,
        ),
    )


def drafter_losses(
    model, head, batch: dict, scale: torch.Tensor, vocab: torch.Tensor, noise: float, two_steps: bool = True
) -> dict:
    """Smooth L1 of the guessed features (per-dimension scale) + cross-entropy of the LM head on them
    against the model's own next token, for draft step 1 (and 2). `vocab`: the token ids scored (the
    full LM head would cost more than the layer itself)."""
    features = batch["features"]
    if noise:
        features = features + torch.randn_like(features) * noise * scale  # drafting reads its own guesses
    if two_steps:
        guesses = model.forward_two_steps(features, batch["embeds"], batch["next_embeds"])
    else:
        guesses = (model(features, batch["embeds"]),)
    head_rows = head.lm_head.weight[vocab].float()
    index = torch.full((head.lm_head.weight.shape[0],), -1, dtype=torch.int64)
    index[vocab] = torch.arange(len(vocab))
    out = {}
    for step, guess in enumerate(guesses, 1):
        mask, tokens = batch[f"mask{step}"], batch[f"token{step}"]
        error = F.smooth_l1_loss(guess / scale, batch[f"target{step}"] / scale, reduction="none").mean(-1)
        out[f"reg{step}"] = (error * mask).sum() / mask.sum().clamp(min=1)
        keep = tokens >= 0
        logits = head.norm(guess[keep].float()) @ head_rows.T
        targets = index[tokens[keep]]
        out[f"ce{step}"] = F.cross_entropy(logits.float(), targets) if len(targets) else guess.sum() * 0
        out[f"acc{step}"] = (
            (logits.argmax(-1) == targets).float().mean() if len(targets) else torch.tensor(0.0)
        )
    return out


def scored_vocabulary(records: list[dict], size: int, seed: int, full: int = 8192, others: int = 1024):
    """The token ids the cross-entropy scores: all of them for a small vocabulary; else every token of the
    answers plus a fixed random sample of the rest (so that no unseen token can win the argmax untrained)."""
    if size <= full:
        return torch.arange(size)
    seen = {t for r in records for t in r["tokens"][r["prompt_length"] :]}
    sample = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:others].tolist()
    return torch.tensor(sorted(seen | set(sample)))


def draft_vocabulary(records: list[dict], size: int, count: int) -> torch.Tensor | None:
    """The `count` token ids the drafter may propose: the answers' most frequent tokens, then the lowest
    ids (a BPE vocabulary lists its most frequent merges first); None (all) when that is most of it. The
    LM head over them is most of a draft token's cost (~9k of 49k rows: ~0.4 ms in bfloat16 here)."""
    if count > size // 2:
        return None
    seen = Counter(t for r in records for t in r["tokens"][r["prompt_length"] :])
    ids = [t for t, _ in sorted(seen.items(), key=lambda item: (-item[1], item[0]))[:count]]
    ids += [t for t in range(size) if t not in seen][: count - len(ids)]
    return torch.tensor(sorted(ids))


def vocabulary_coverage(records: list[dict], vocab: torch.Tensor | None) -> float:
    """The share of the answers' tokens that the draft vocabulary holds."""
    if vocab is None:
        return 1.0
    allowed = set(vocab.tolist())
    answers = [t for r in records for t in r["tokens"][r["prompt_length"] :]]
    return sum(t in allowed for t in answers) / max(len(answers), 1)


def length_batches(records: list[dict], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Random batches of sequences of similar lengths (less padding to compute): a random order, sorted by
    length within windows of 16 batches, cut into batches, the batches shuffled."""
    order = torch.randperm(len(records), generator=generator).tolist()
    window = 16 * batch_size
    batches = []
    for first in range(0, len(order), window):
        part = sorted(order[first : first + window], key=lambda i: len(records[i]["tokens"]))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_drafter(
    model,
    head,
    records: list[dict],
    *,
    epochs: int = 8,
    batch_size: int = 8,
    lr: float = 1e-3,
    noise: float = 0.05,
    ce_weight: float = 0.1,
    step2_weight: float = 0.5,
    seed: int = SEED,
    bfloat16: bool = False,
    log=print,
) -> dict:
    """Train `model` (a FeatureDrafterModel) on `records` (tokens, prompt_length, features); returns the
    last epoch's mean losses and step-1/step-2 accuracies on the answer tokens."""
    torch.manual_seed(seed)
    every = torch.cat([r["features"].float() for r in records])
    scale = every.std(0).clamp(min=1e-3 * float(every.std()))  # per dimension: a few are huge
    vocab = scored_vocabulary(records, head.embed_tokens.weight.shape[0], seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(records) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    means: dict = {}
    for epoch in range(epochs):
        began = time.perf_counter()
        batches = length_batches(records, batch_size, generator)
        sums: dict = {}
        count = 0
        for chosen in batches:
            batch = sequence_batch([records[i] for i in chosen], head)
            # bfloat16 matmuls (weights and optimizer stay float32) train twice as fast on this CPU.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                parts = drafter_losses(model, head, batch, scale, vocab, noise, step2_weight > 0)
            step1 = parts["reg1"] + ce_weight * parts["ce1"]
            loss = step1
            if step2_weight > 0:
                loss = loss + step2_weight * (parts["reg2"] + ce_weight * parts["ce2"])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            count += 1
        means = {key: value / count for key, value in sums.items()}
        log(
            f"  epoch {epoch + 1}/{epochs}: "
            + " ".join(f"{key} {value:.3f}" for key, value in means.items())
            + f" ({time.perf_counter() - began:.0f} s)"
        )
    model.eval()
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 or a checkpoint folder")
    parser.add_argument("--data", type=Path, default=ROOT / "tmp" / "data")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--gen-batch", type=int, default=50)
    parser.add_argument("--gen-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="train in bf16")
    parser.add_argument("--step2-weight", type=float, default=0.5, help="0: train the first draft step only")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="how many token ids it may propose")
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument(
        "--answers", type=Path, default=None, help="train on bench/distill_answers.py's shards in this folder"
    )
    parser.add_argument("--limit", type=int, default=None, help="with --answers: the first N answers only")
    parser.add_argument("--features", type=Path, default=Path("/work/data/features"), help="their cache")
    parser.add_argument("--feature-dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    path = model_path(args.model, args.data)
    # bfloat16 generates twice as fast as float32 on CPU; its answers and features differ from float32's
    # by rounding, which the training's feature noise covers (held-out measures use float32).
    dtype = getattr(torch, args.gen_dtype)
    if args.answers is not None:  # answers generated at scale (bench/distill_answers.py), features here
        from bench.drafter_features import answer_records

        feature_dtype = getattr(torch, args.feature_dtype)
        records = answer_records(path, args.answers, args.features, args.limit, feature_dtype)
    else:
        prompts = training_prompts(args.prompts)
        records = load_or_make_data(path, args.data, prompts, args.new_tokens, args.gen_batch, dtype)
    answer_tokens = sum(len(r["tokens"]) - r["prompt_length"] for r in records)
    print(f"{len(records)} sequences, {answer_tokens} answer tokens")
    if args.data_only:
        return 0
    from engine.client.feature_drafter import DrafterConfig, FeatureDrafterModel, save_feature_drafter
    from engine.models import load_client_parts, load_config

    head = load_client_parts(path)
    names = [path.name, getattr(load_config(path), "dht_prefix", None)]
    if args.model == "smollm2":
        names.append("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = DrafterConfig.for_target(
        load_config(path),
        head,
        [n for n in names if n],
        made_by="bench/train_drafter.py",
        prompts=args.prompts if args.answers is None else None,
        answers=len(records),
        new_tokens=args.new_tokens if args.answers is None else None,
        epochs=args.epochs,
        seed=SEED,
    )
    model = FeatureDrafterModel(config).init_weights(SEED)
    print(
        f"training: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {args.epochs} epochs"
    )
    began = time.perf_counter()
    final = train_drafter(
        model,
        head,
        records,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch,
        bfloat16=args.bf16,
        step2_weight=args.step2_weight,
    )
    out = args.out or ROOT / "engine" / "resources" / "drafters" / path.name
    vocab = draft_vocabulary(records, head.embed_tokens.weight.shape[0], args.draft_vocab)
    save_feature_drafter(model, out, vocab)
    if vocab is not None:
        coverage = vocabulary_coverage(records, vocab)
        print(f"draft vocabulary: {len(vocab)} tokens, {coverage:.1%} of the answers' tokens")
    print(
        f"trained in {time.perf_counter() - began:.0f} s; step-1/2 accuracy on training answers "
        f"{final['acc1']:.0%}/{final.get('acc2', 0):.0%}; saved to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
