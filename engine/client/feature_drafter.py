"""A trained feature-level drafter (EAGLE, Li et al. 2024): one small decoder layer on the client.

In a swarm the client holds the embeddings, final norm and LM head, and gets back the last block's output
(the "feature", before the final norm) at every position it sends. EAGLE's observation: the next feature is
far easier to predict than the next token, once the draft layer also sees the token that was actually
chosen (which settles the sampling's uncertainty). So the drafter reads, at each position i, the pair
(feature_i, embedding of token_{i+1}) through `fc` (2d -> d) and one Llama-style decoder layer, and its
output is its guess of feature_{i+1}; the client's own norm + LM head turn that into the next draft token,
whose embedding and the guessed feature feed the next draft step.

A drafter is trained for one target model (bench/train_drafter.py) and saved as `drafter.safetensors`
(float16) beside `drafter.json` (its shape and the target's identity, including a probe of the target's
embedding matrix), so it is never used with another model: loading it against another head raises
DrafterMismatchError. `FeatureDrafterFactory` holds the loaded layer; each generation takes a fresh,
cheap `FeatureDrafter` (its state is the layer's KV cache).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.client.speculative import common_prefix

FORMAT = "pollinate-feature-drafter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "drafter.safetensors"
DRAFT_VOCAB = "draft_vocab"  # optional tensor of the weights file: the token ids a drafter may propose
CONFIG_FILE = "drafter.json"
# Drafters shipped with the engine, one folder each (engine/resources/drafters/<model>/).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "resources" / "drafters"

# The embedding probe: these rows' first PROBE_WIDTH values identify the target's embedding matrix.
PROBE_ROWS = (0, 1, 2, 3, 17, 100, 1000, 4096)
PROBE_WIDTH = 8
PROBE_TOLERANCE = 2e-2  # float16 vs float32 vs bfloat16 copies of one checkpoint differ by less


class DrafterError(ValueError):
    """A drafter folder that cannot be read (missing files, another format)."""


class DrafterMismatchError(DrafterError):
    """A drafter trained for another model than the one it is asked to draft for."""


@dataclass(frozen=True)
class DrafterConfig:
    """The draft layer's shape and the identity of the model it was trained for."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    target_names: tuple[str, ...] = ()  # names the target model goes by (folder name, dht prefix, hub id)
    embed_probe: tuple[float, ...] = ()  # embed_probe(target's embedding matrix)
    notes: dict = field(default_factory=dict)  # how it was made (training data, held-out acceptance)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def for_target(cls, model_config, head, names: Sequence[str] = (), **notes) -> DrafterConfig:
        """A draft layer sized like one of the target's blocks (`model_config`: its transformers config)."""
        rope = getattr(model_config, "rope_theta", None)
        if rope is None:
            rope = (getattr(model_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(
            hidden_size=model_config.hidden_size,
            intermediate_size=model_config.intermediate_size,
            num_attention_heads=model_config.num_attention_heads,
            num_key_value_heads=getattr(
                model_config, "num_key_value_heads", model_config.num_attention_heads
            ),
            vocab_size=head.embed_tokens.weight.shape[0],
            rms_norm_eps=float(getattr(model_config, "rms_norm_eps", 1e-5)),
            rope_theta=float(rope),
            target_names=tuple(names),
            embed_probe=embed_probe(head.embed_tokens.weight),
            notes=dict(notes),
        )

    def check_target(self, head) -> None:
        """Raise DrafterMismatchError unless `head` (a ClientHead) is the model this drafter was made for."""
        name = self.target_names[0] if self.target_names else "another model"
        vocab, hidden = head.embed_tokens.weight.shape
        if (vocab, hidden) != (self.vocab_size, self.hidden_size):
            raise DrafterMismatchError(
                f"this drafter was trained for {name} (vocabulary {self.vocab_size}, hidden size "
                f"{self.hidden_size}); the model has vocabulary {vocab} and hidden size {hidden}. "
                "Use a drafter trained for this model (bench/train_drafter.py), or none."
            )
        probe = embed_probe(head.embed_tokens.weight)
        if len(probe) != len(self.embed_probe) or any(
            abs(a - b) > PROBE_TOLERANCE * max(1.0, abs(b))
            for a, b in zip(probe, self.embed_probe, strict=True)
        ):
            raise DrafterMismatchError(
                f"this drafter was trained for {name}, whose embeddings differ from this model's (same "
                "shape, other weights). Use a drafter trained for this model (bench/train_drafter.py), "
                "or none."
            )


def embed_probe(weight: torch.Tensor) -> tuple[float, ...]:
    """A few values of the embedding matrix that tell one model's weights from another's."""
    rows = [r for r in PROBE_ROWS if r < weight.shape[0]]
    values = weight[rows, :PROBE_WIDTH].detach().float().flatten()
    return tuple(round(float(v), 5) for v in values)


# --- the draft layer ---


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary position embedding of x [B, heads, T, head_dim] at `positions` [T]."""
    half = x.shape[-1] // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32, device=x.device) / half))
    angles = positions.to(torch.float32)[:, None] * inv[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class LayerCache:
    """The draft layer's keys and values for the positions read so far (cut back with `crop`)."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def crop(self, length: int) -> None:
        if self.keys is not None and length < len(self):
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)
        return self.keys, self.values


class FeatureDrafterModel(nn.Module):
    """fc over (feature_i, embedding of token_{i+1}), then one Llama decoder layer: feature_{i+1}'s guess."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        hd = config.head_dim
        self.fc = nn.Linear(2 * d, d)
        self.input_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, heads * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(heads * hd, d, bias=False)
        self.post_norm = RMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(
        self,
        features: torch.Tensor,
        embeddings: torch.Tensor,
        start: int = 0,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """features, embeddings [B, T, d] at positions start..start+T-1 -> predicted next features [B, T, d].

        With `cache`, the positions before `start` are the cache's (batch 1). Training batches are padded
        at the end, which causal attention keeps out of every real position's view."""
        t = features.shape[1]
        x, q, k, v = self._project(
            features, embeddings, torch.arange(start, start + t, device=features.device)
        )
        if cache is not None:
            k, v = cache.append(k, v)
        k, v = self._expand(k), self._expand(v)
        # Causal over the whole cache: query j (position start+j) sees keys 0..start+j.
        total = k.shape[2]
        query_positions = total - t + torch.arange(t, device=x.device)
        mask = torch.arange(total, device=x.device)[None, :] <= query_positions[:, None]
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward_two_steps(
        self, features: torch.Tensor, embeddings: torch.Tensor, next_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: the first draft step at every position, and the second one as drafting runs it.

        Step 1 reads (feature_i, embedding_{i+1}) at position i and guesses feature_{i+1}; step 2 reads
        (that guess, next_embeddings_i = embedding_{i+2}) at position i+1 and sees step 1's keys of
        positions 0..i (real features) and itself, as the 2nd draft token does after positions 0..i were
        verified. All inputs [B, T, d]; returns both guesses [B, T, d]."""
        t = features.shape[1]
        positions = torch.arange(t, device=features.device)
        x1, q1, k1, v1 = self._project(features, embeddings, positions)
        k1, v1 = self._expand(k1), self._expand(v1)
        guess1 = self._finish(x1, F.scaled_dot_product_attention(q1, k1, v1, is_causal=True))
        x2, q2, k2, v2 = self._project(guess1, next_embeddings, positions + 1)
        k2, v2 = self._expand(k2), self._expand(v2)
        scale = q2.shape[-1] ** -0.5
        earlier = (q2 @ k1.transpose(-1, -2)) * scale  # [B, H, T, T]: query i vs step-1 key j
        earlier = earlier.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=x2.device).tril(), -math.inf)
        own = (q2 * k2).sum(-1, keepdim=True) * scale  # [B, H, T, 1]
        weights = torch.softmax(torch.cat([earlier, own], -1), -1)
        attn = weights[..., :t] @ v1 + weights[..., t:] * v2
        return guess1, self._finish(x2, attn)

    def _project(self, features, embeddings, positions):
        c = self.config
        b, t, _ = features.shape
        x = self.fc(torch.cat([features, embeddings], -1))
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return x, rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: each key/value head serves num_attention_heads / num_key_value_heads."""
        return kv.repeat_interleave(self.config.num_attention_heads // self.config.num_key_value_heads, 1)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def init_weights(self, seed: int = 0) -> FeatureDrafterModel:
        """A start that predicts feature_{i+1} = feature_i: fc passes the feature through, and the layer's
        output projections are zero, so training learns the change from one position to the next."""
        d = self.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * fan_in**-0.5)
            self.fc.weight.zero_()
            self.fc.weight[:, :d] = torch.eye(d)
            self.fc.weight[:, d:] = torch.randn(d, d, generator=generator) * 0.01
            self.fc.bias.zero_()
            self.o_proj.weight.zero_()
            self.down_proj.weight.zero_()
        return self


# --- saving and loading ---


def save_feature_drafter(
    model: FeatureDrafterModel, folder: str | Path, draft_vocab: torch.Tensor | None = None
) -> Path:
    """Write `drafter.safetensors` (float16) and `drafter.json` into `folder`. `draft_vocab`: the token ids
    the drafter may propose (None: all); the LM head over a subset costs a fraction of the whole one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()}
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB] = torch.as_tensor(draft_vocab, dtype=torch.int64).contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = asdict(model.config)
    config["target_names"] = list(config["target_names"])
    config["embed_probe"] = list(config["embed_probe"])
    doc = {"format": FORMAT, "version": FORMAT_VERSION, **config}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    return folder


def read_drafter_config(folder: str | Path) -> DrafterConfig:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise DrafterError(f"{folder} is not a feature drafter: it has no {CONFIG_FILE}") from error
    except json.JSONDecodeError as error:
        raise DrafterError(f"{path} is not valid JSON ({error}); re-create the drafter") from error
    if doc.pop("format", None) != FORMAT or doc.pop("version", None) != FORMAT_VERSION:
        raise DrafterError(
            f"{path} is not a {FORMAT} version {FORMAT_VERSION} file; re-create the drafter with this version"
        )
    doc["target_names"] = tuple(doc.get("target_names", ()))
    doc["embed_probe"] = tuple(doc.get("embed_probe", ()))
    try:
        return DrafterConfig(**doc)
    except TypeError as error:
        raise DrafterError(f"{path} does not describe a feature drafter: {error}") from error


class FeatureDrafterFactory:
    """A loaded draft layer checked against the target's client head; call it for a fresh drafter."""

    def __init__(self, model: FeatureDrafterModel, head, draft_vocab: torch.Tensor | None = None):
        model.config.check_target(head)
        self.model = model.to(dtype=head.dtype, device=head.device).eval().requires_grad_(False)
        self.head = head
        self.draft_vocab = None
        self.head_rows = self.head_bias = None  # the LM head's rows of draft_vocab, sliced once
        if draft_vocab is not None:
            vocab = torch.as_tensor(draft_vocab, dtype=torch.int64)
            if (
                vocab.ndim != 1
                or len(vocab) == 0
                or int(vocab.min()) < 0
                or int(vocab.max()) >= model.config.vocab_size
            ):
                raise DrafterError(f"the drafter's {DRAFT_VOCAB} holds ids outside the vocabulary")
            self.draft_vocab = vocab.to(head.device)
            self.head_rows = head.lm_head.weight[self.draft_vocab].detach()
            bias = getattr(head.lm_head, "bias", None)
            self.head_bias = None if bias is None else bias[self.draft_vocab].detach()

    @property
    def config(self) -> DrafterConfig:
        return self.model.config

    def __call__(self) -> FeatureDrafter:
        return FeatureDrafter(self.model, self.head, self.draft_vocab, (self.head_rows, self.head_bias))


def load_feature_drafter(folder: str | Path, head) -> FeatureDrafterFactory:
    """The drafter saved in `folder`, for the model whose client head is `head` (DrafterMismatchError if
    it was trained for another model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_drafter_config(folder)
    config.check_target(head)
    model = FeatureDrafterModel(config)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except FileNotFoundError as error:
        raise DrafterError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}") from error
    draft_vocab = tensors.pop(DRAFT_VOCAB, None)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise DrafterError(
            f"{folder / WEIGHTS_FILE} does not fit its config (missing {missing}, extra {unexpected})"
        )
    return FeatureDrafterFactory(model, head, draft_vocab)


def shipped_drafter_path(*names: str | None, root: Path = SHIPPED_DIR) -> Path | None:
    """The folder of a drafter shipped with the engine for a model known by any of `names` (its folder name,
    dht prefix or hub id, e.g. "SmolLM2-135M-Instruct"), or None. Loading still checks the weights."""
    wanted = {_simple_name(n) for n in names if n}
    if not wanted or not root.is_dir():
        return None
    for folder in sorted(root.iterdir()):
        try:
            config = read_drafter_config(folder)
        except DrafterError:
            continue
        if wanted & {_simple_name(n) for n in config.target_names}:
            return folder
    return None


def _simple_name(name: str) -> str:
    """The model part of a name: "HuggingFaceTB/SmolLM2-135M-Instruct-hf" -> "smollm2-135m-instruct"."""
    return str(name).rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-hf")


# --- drafting ---


class FeatureDrafter:
    """Drafts greedily from the verified positions' features (one object per generation: it keeps the draft
    layer's KV cache, reused for the prefix that the next call's verified positions share)."""

    wants_features = True

    def __init__(self, model: FeatureDrafterModel, head, draft_vocab=None, head_rows=(None, None)):
        self.model = model
        self.head = head
        self.draft_vocab = draft_vocab  # token ids it may propose (None: all), and their LM head rows
        self.head_rows, self.head_bias = head_rows
        self.cache = LayerCache()
        self.read: list[int] = []  # token_{i+1} of each cached position i read with a real feature

    def draft_with_features(
        self, tokens: Sequence[int], features: torch.Tensor, k: int
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k greedy draft tokens after `tokens` (point masses: None for the distributions).

        `features` [n-1, d]: row i is the last block's output (before the final norm) at position i; the
        last token, tokens[n-1], has none yet."""
        tokens = list(tokens)
        n = len(tokens)
        if k <= 0 or n < 2:
            return [], None
        if (
            features.ndim != 2
            or features.shape[0] < n - 1
            or features.shape[1] != self.model.config.hidden_size
        ):
            raise ValueError(
                f"need features [{n - 1}, {self.model.config.hidden_size}] for {n} tokens, "
                f"got {list(features.shape)}"
            )
        wanted = tokens[1:n]  # position i pairs feature_i with token_{i+1}
        common = min(common_prefix(self.read, wanted), n - 2)  # read >= 1 position: it starts the draft
        self.cache.crop(common)
        dtype = next(self.model.parameters()).dtype
        drafts: list[int] = []
        with torch.no_grad():
            feats = features[common : n - 1].to(device=self.head.device, dtype=dtype)[None]
            ids = torch.tensor([wanted[common:]], dtype=torch.int64)
            out = self.model(feats, self.head.embed(ids).to(dtype), common, self.cache)
            self.read = wanted
            guess = out[:, -1:]
            for step in range(k):
                token = self._argmax(guess)
                drafts.append(token)
                if step + 1 == k:
                    break
                embedding = self.head.embed(torch.tensor([[token]], dtype=torch.int64)).to(dtype)
                guess = self.model(guess, embedding, n - 1 + step, self.cache)
        self.cache.crop(n - 1)  # drafted positions are guesses: never reused
        return drafts, None

    def _argmax(self, guess: torch.Tensor) -> int:
        """The greedy token of a guessed feature [1, 1, d], among draft_vocab when it is set."""
        if self.draft_vocab is None:
            return int(self.head.logits(guess)[0, -1].argmax())
        hidden = self.head.norm(guess.to(dtype=self.head.dtype))[0, -1]
        return int(self.draft_vocab[F.linear(hidden, self.head_rows, self.head_bias).argmax()])
