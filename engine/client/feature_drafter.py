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
DrafterMismatchError. `FeatureDrafterFactory` holds the loaded layer, prepared once for drafting
(engine.client.draft_layer: ~1.5-4 ms of CPU per draft token here, not 10-35); each generation takes a
fresh, cheap `FeatureDrafter` (its state is the layer's KV cache). It drafts a greedy chain
(`draft_with_features`) or a tree of candidate continuations (`draft_tree`, for tree speculation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.client.draft_layer import DraftCache, PreparedDraftLayer, draft_threads
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
    ) -> torch.Tensor:
        """features, embeddings [B, T, d] at positions 0..T-1 -> predicted next features [B, T, d] (training;
        drafting runs engine.client.draft_layer). Training batches are padded at the end, which causal
        attention keeps out of every real position's view."""
        t = features.shape[1]
        x, q, k, v = self._project(features, embeddings, torch.arange(t, device=features.device))
        k, v = self._expand(k), self._expand(v)
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

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
    """A loaded draft layer checked against the target's client head; call it for a fresh drafter.

    `dtype`: the products' dtype when drafting (default: bfloat16 on CPU, see engine.client.draft_layer)."""

    def __init__(
        self,
        model: FeatureDrafterModel,
        head,
        draft_vocab: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ):
        model.config.check_target(head)
        self.model = model.to(dtype=head.dtype, device=head.device).eval().requires_grad_(False)
        self.head = head
        self.draft_vocab = None
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
        self.layer = PreparedDraftLayer(self.model, head, self.draft_vocab, dtype)  # shared by generations

    @property
    def config(self) -> DrafterConfig:
        return self.model.config

    def __call__(self) -> FeatureDrafter:
        return FeatureDrafter(self.layer)


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


class DraftNode(NamedTuple):
    """A node of a draft tree: `parent` indexes the tree's node list (-1: follows the last verified token);
    `score` is the drafter's probability of the whole path from the root to this node."""

    parent: int
    token: int
    score: float


class FeatureDrafter:
    """Drafts from the verified positions' features (one object per generation: it keeps the draft layer's
    KV cache, reused for the prefix that the next call's verified positions share)."""

    wants_features = True

    def __init__(self, layer: PreparedDraftLayer):
        self.layer = layer
        c = layer.config
        self.cache = DraftCache(c.num_key_value_heads, c.head_dim, layer.device)
        self.read: list[int] = []  # token_{i+1} of each cached position i read with a real feature

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        return self.layer.vocab

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
        layer = self.layer
        drafts: list[int] = []
        with torch.no_grad(), draft_threads():
            guess = self._read_verified(tokens, features)
            for step in range(k):
                drafts.append(int(layer.token_ids(layer.logits(guess)[0].argmax())))
                if step + 1 == k:
                    break
                position = torch.tensor([n - 1 + step])
                guess = layer.step(guess, layer.embed(drafts[-1:]), position, self.cache)
        self.cache.crop(n - 1)  # drafted positions are guesses: never reused
        return drafts, None

    def draft_tree(
        self, tokens: Sequence[int], features: torch.Tensor, *, depth: int, width: int, max_nodes: int
    ) -> list[DraftNode]:
        """Candidate continuations after `tokens` as a tree (EAGLE-2's expansion: at each depth the `width`
        likeliest nodes get their `width` likeliest children, all of a depth in one draft-layer step),
        cut to the `max_nodes` likeliest nodes. Nodes in topological order (depth by depth, likeliest
        first, so node 0 is the greedy first draft); `features` as for draft_with_features."""
        tokens = list(tokens)
        n = len(tokens)
        if depth <= 0 or width <= 0 or max_nodes <= 0 or n < 2:
            return []
        layer = self.layer
        verified = n - 1
        nodes: list[tuple[int, int, float]] = []  # (parent, token, log-probability of the path)
        inputs: list[torch.Tensor] = []  # each node's input feature: its parent's guess
        with torch.no_grad(), draft_threads():
            guess = self._read_verified(tokens, features)
            frontier = self._children(-1, guess, layer.logits(guess), width, nodes, inputs, 0.0)
            slots: dict[int, int] = {}  # expanded node -> its row in the cache
            for level in range(1, depth):
                expand = sorted(frontier, key=lambda i: -nodes[i][2])[:width]
                first = len(self.cache)
                mask = torch.zeros(len(expand), first + len(expand), dtype=torch.bool)
                mask[:, :verified] = True
                for row, node in enumerate(expand):
                    slots[node] = first + row
                    ancestor = node
                    while ancestor >= 0:
                        mask[row, slots[ancestor]] = True
                        ancestor = nodes[ancestor][0]
                guesses = layer.step(
                    torch.stack([inputs[i] for i in expand]),
                    layer.embed([nodes[i][1] for i in expand]),
                    torch.full((len(expand),), verified + level - 1),
                    self.cache,
                    mask,
                )
                logits = layer.logits(guesses)
                frontier = []
                for row, node in enumerate(expand):
                    guess, row_logits = guesses[row : row + 1], logits[row : row + 1]
                    frontier += self._children(node, guess, row_logits, width, nodes, inputs, nodes[node][2])
        self.cache.crop(verified)
        return select_tree(nodes, max_nodes)

    def _children(self, parent, guess, logits, width, nodes, inputs, score) -> list[int]:
        """Append `parent`'s `width` likeliest children (their input: `guess` [1, d]); their indices."""
        top = torch.log_softmax(logits[0].float(), -1).topk(min(width, logits.shape[-1]))
        ids = self.layer.token_ids(top.indices).tolist()
        added = []
        for token, logp in zip(ids, top.values.tolist(), strict=True):
            added.append(len(nodes))
            nodes.append((parent, int(token), score + logp))
            inputs.append(guess[0])
        return added

    def _read_verified(self, tokens: list[int], features: torch.Tensor) -> torch.Tensor:
        """Reads the verified positions the cache lacks (position i: feature_i with token_{i+1}) and returns
        the guess of feature_{n-1} [1, d], the last token's, which the servers have not computed yet."""
        n = len(tokens)
        d = self.layer.config.hidden_size
        if features.ndim != 2 or features.shape[0] < n - 1 or features.shape[1] != d:
            raise ValueError(f"need features [{n - 1}, {d}] for {n} tokens, got {list(features.shape)}")
        wanted = tokens[1:n]
        common = min(common_prefix(self.read, wanted), n - 2)  # read >= 1 position: it starts the draft
        self.cache.crop(common)
        positions = torch.arange(common, n - 1)
        mask = None
        if len(positions) > 1:  # causal among the new rows; every row sees the whole kept prefix
            mask = torch.arange(n - 1)[None, :] <= positions[:, None]
        feats = features[common : n - 1].to(device=self.layer.device, dtype=torch.float32)
        out = self.layer.step(feats, self.layer.embed(wanted[common:]), positions, self.cache, mask)
        self.read = wanted
        return out[-1:]


def select_tree(nodes: Sequence[tuple[int, int, float]], max_nodes: int) -> list[DraftNode]:
    """The `max_nodes` likeliest of `nodes` (parent, token, log-probability of the path; parents listed
    before their children), in topological order: by depth, then likeliest first. A child is never
    likelier than its parent, and ties go to the shallower node, so every kept node's parent is kept."""
    depths: list[int] = []
    for parent, _token, _score in nodes:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    best = sorted(range(len(nodes)), key=lambda i: (-nodes[i][2], depths[i], i))[:max_nodes]
    kept = sorted(best, key=lambda i: (depths[i], -nodes[i][2], i))
    index = {old: new for new, old in enumerate(kept)}
    return [
        DraftNode(-1 if nodes[i][0] < 0 else index[nodes[i][0]], nodes[i][1], math.exp(nodes[i][2]))
        for i in kept
    ]
