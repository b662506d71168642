"""Tiny random checkpoints built without any network: the embedded demo model and test models.

A checkpoint here is a real Hugging Face folder (config.json, sharded safetensors with an index,
tokenizer.json with a chat template), so the code that loads it is the same code that loads a real
model. The weights are random (fixed seed): the text such a model writes is gibberish by design.
"""

from __future__ import annotations

import json
from pathlib import Path

# Text the byte-level BPE tokenizer is trained on; any fixed text gives a deterministic vocabulary.
_TOKENIZER_CORPUS = (
    "Pollinate shares GPUs in a peer-to-peer swarm that runs large language models. "
    "Each volunteer hosts a few transformer blocks and a client chains servers into a pipeline. "
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris. "
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? "
    "system user assistant You are a helpful assistant. Please answer the question below. "
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")

# ChatML: understood by people and by every OpenAI-style client; the generation prompt opens the reply.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "falcon", "bloom")

DEMO_MODEL_NAME = "pollinate-demo-tiny-llama"
DEMO_MODEL_LABEL = "Demo model (tiny, random weights: its replies are gibberish)"


def build_tokenizer(vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer offline and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(arch: str, tokenizer, *, num_layers: int = 4, hidden_size: int = 64, **overrides):
    """A config of family `arch` small enough to run anywhere, with the tokenizer's special ids."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch in ("falcon", "bloom"):  # their own field names
        # Both tie the LM head to the embeddings by default; a tiny random model tied that way just repeats
        # the last token (its residual stream is mostly that token's embedding): untied, greedy varies.
        fields["tie_word_embeddings"] = False
        if arch == "falcon":  # Falcon-40B's layout: grouped KV heads, two parallel LayerNorms
            fields.update(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False)
    else:
        fields.update(
            intermediate_size=hidden_size * 2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    if arch in ("qwen2", "qwen3"):
        fields["use_sliding_window"] = False
    if arch in ("mistral", "mixtral"):
        fields["sliding_window"] = None
    if arch == "mixtral":
        fields.update(num_local_experts=4, num_experts_per_tok=2)
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def build_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
    max_shard_size: str = "40KB",
    **config_overrides,
) -> Path:
    """Save a random-weight model of family `arch` (sharded safetensors + tokenizer); return its folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, tokenizer, num_layers=num_layers, hidden_size=hidden_size, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform logits; a wider spread makes greedy choices distinct
    # (so token-for-token comparisons are meaningful, not decided by float noise).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _write_marker(path, arch=arch, seed=seed)
    return path


def _write_marker(path: Path, **facts) -> None:
    (path / "pollinate_tiny.json").write_text(json.dumps({"random_weights": True, **facts}, indent=1))


def is_tiny_checkpoint(path: str | Path) -> bool:
    """True for folders made by build_tiny_checkpoint (random weights: label them as such)."""
    return (Path(path) / "pollinate_tiny.json").is_file()
