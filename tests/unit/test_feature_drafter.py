"""The trained feature drafter (EAGLE-style): saving, the wrong-model refusal, its cache, and training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.train_drafter import train_drafter
from engine.client.draft_layer import DraftCache
from engine.client.feature_drafter import (
    CONFIG_FILE,
    DrafterConfig,
    DrafterError,
    DrafterMismatchError,
    FeatureDrafterFactory,
    FeatureDrafterModel,
    load_feature_drafter,
    save_feature_drafter,
    select_tree,
    shipped_drafter_path,
)
from engine.models import load_client_parts, load_config


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory):
    """A tiny random Llama, its client head, and its greedy continuations of random prompts with the
    features (last block's output before the final norm) of every position."""
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama", num_layers=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = load_client_parts(path)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, hf.config.vocab_size, (256, 6), generator=generator)
    kept = []
    hook = hf.model.layers[-1].register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        with torch.no_grad():
            out = hf.generate(prompts, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
            kept.clear()
            hf(input_ids=out)
    finally:
        hook.remove()
    features = kept[0][0] if isinstance(kept[0], tuple) else kept[0]
    records = [
        dict(tokens=out[row].tolist(), prompt_length=6, features=features[row, :-1].clone())
        for row in range(len(out))
    ]
    return path, head, records


def new_model(path, head, seed=0):
    config = DrafterConfig.for_target(load_config(path), head, [path.name, "tiny-llama-hf"])
    return FeatureDrafterModel(config).init_weights(seed)


def first_token_acceptance(factory, records) -> float:
    """Teacher-forced: how often the 1st draft token is the model's own next token in the answers."""
    right = total = 0
    for r in records:
        drafter = factory()
        tokens, features = r["tokens"], r["features"]
        for t in range(r["prompt_length"], len(tokens)):
            drafts, probs = drafter.draft_with_features(tokens[:t], features[: t - 1], 1)
            assert probs is None and len(drafts) == 1
            right += drafts[0] == tokens[t]
            total += 1
    return right / total


def test_saved_drafter_loads_with_the_same_drafts_and_refuses_another_model(
    tiny, tiny_checkpoint_factory, tmp_path
):
    path, head, records = tiny
    model = new_model(path, head)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the initial pass-through: the weights must survive
    model.float()
    folder = save_feature_drafter(model.half().float(), tmp_path / "drafter")  # what float16 keeps
    loaded = load_feature_drafter(folder, head)
    assert loaded.config == model.config and loaded.draft_vocab is None
    original = FeatureDrafterFactory(model, head)
    r = records[0]
    for t in (8, 15, 29):
        assert loaded().draft_with_features(
            r["tokens"][:t], r["features"][: t - 1], 4
        ) == original().draft_with_features(r["tokens"][:t], r["features"][: t - 1], 4)
    # Found by any of its target's names; not for another model.
    assert shipped_drafter_path("HuggingFaceTB/tiny-llama", root=tmp_path) == folder
    assert shipped_drafter_path(path.name, root=tmp_path) == folder
    assert shipped_drafter_path("SomeOtherModel-7B", root=tmp_path) is None
    # Same shape, other weights (another seed): refused with a clear message.
    other = load_client_parts(tiny_checkpoint_factory("llama", num_layers=2, seed=5))
    with pytest.raises(DrafterMismatchError, match="embeddings differ"):
        load_feature_drafter(folder, other)
    # Another hidden size: refused before anything is read.
    wide = load_client_parts(tiny_checkpoint_factory("llama", num_layers=2, hidden_size=96))
    with pytest.raises(DrafterMismatchError, match="hidden size"):
        load_feature_drafter(folder, wide)
    # Not a drafter folder / another format: clear errors.
    with pytest.raises(DrafterError, match=r"no drafter\.json"):
        load_feature_drafter(tmp_path, head)
    doc = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(DrafterError, match="version"):
        load_feature_drafter(folder, head)


def test_a_draft_vocabulary_limits_the_proposals_to_it_and_survives_saving(tiny, tmp_path):
    path, head, records = tiny
    model = new_model(path, head, seed=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.half().float()
    r = records[2]
    history, features = r["tokens"][:12], r["features"][:11]
    drafts, _ = FeatureDrafterFactory(model, head)().draft_with_features(history, features, 4)
    # Every full-vocabulary choice inside the subset: the same drafts, after a save and load.
    vocab = torch.tensor(sorted(set(drafts) | set(range(5, 60))))
    folder = save_feature_drafter(model, tmp_path / "limited", vocab)
    limited = load_feature_drafter(folder, head)
    assert torch.equal(limited.draft_vocab, vocab)
    assert limited().draft_with_features(history, features, 4)[0] == drafts
    # The first choice left out: the drafter proposes something else, from the subset only.
    without = vocab[vocab != drafts[0]]
    other, _ = FeatureDrafterFactory(model, head, without)().draft_with_features(history, features, 4)
    assert other[0] != drafts[0] and set(other) <= set(without.tolist())
    with pytest.raises(DrafterError, match="outside the vocabulary"):
        FeatureDrafterFactory(model, head, torch.tensor([0, 10**6]))


def test_the_cache_reused_across_rounds_drafts_as_a_fresh_drafter(tiny):
    path, head, records = tiny
    model = new_model(path, head, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    factory = FeatureDrafterFactory(model, head)
    r = records[1]
    tokens, features = r["tokens"], r["features"]
    kept = factory()
    # Rounds as speculation makes them: some drafts kept, then a rollback to a shorter history (another
    # token at the cut), then a longer one.
    histories = [tokens[:7], tokens[:9], tokens[:12], [*tokens[:10], 3], tokens[:20], tokens[:21]]
    for history in histories:
        n = len(history)
        feats = features[: n - 1].clone()
        reused = kept.draft_with_features(history, feats, 4)
        fresh = factory().draft_with_features(history, feats, 4)
        assert reused[0] == fresh[0] and len(reused[0]) == 4
        assert len(kept.cache) == n - 1  # the guesses are never kept
    assert kept.draft_with_features(tokens[:1], features[:0], 4) == ([], None)  # no feature yet
    with pytest.raises(ValueError, match="features"):
        kept.draft_with_features(tokens[:9], features[:5], 2)


def test_a_few_training_steps_on_the_models_own_answers_draft_far_better_than_untrained(tiny):
    path, head, records = tiny
    train, held_out = records[:224], records[224:]
    untrained = first_token_acceptance(FeatureDrafterFactory(new_model(path, head), head), held_out)
    model = new_model(path, head)
    final = train_drafter(model, head, train, epochs=8, batch_size=16, lr=3e-3, log=lambda _line: None)
    trained = first_token_acceptance(FeatureDrafterFactory(model, head), held_out)
    # A one-block random target: the draft layer can in principle learn it; 8 epochs get part of the way.
    assert trained >= 0.12 and trained > 3 * untrained, (untrained, trained, final)


def perturbed_model(path, head, seed, scale=0.05):
    model = new_model(path, head, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)  # not the initial pass-through
    return model


def test_the_prepared_draft_layer_computes_what_the_module_computes(tiny):
    """Drafting's layer (joint weights, RoPE table, preallocated cache read in pieces) == the module's
    forward over the whole sequence, in float32; bfloat16 products stay close."""
    path, head, records = tiny
    model = perturbed_model(path, head, seed=5)
    r = records[3]
    tokens, features = r["tokens"], r["features"]
    n = len(tokens)
    embeds = head.embed(torch.tensor([tokens[1:n]]))
    with torch.no_grad():
        expected = model(features[None], embeds)[0]
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        layer = FeatureDrafterFactory(model, head, dtype=dtype).layer
        cache = DraftCache(model.config.num_key_value_heads, model.config.head_dim, capacity=4)
        pieces = []
        with torch.no_grad():
            for first, end in ((0, 1), (1, 9), (9, 10), (10, n - 1)):  # one row, a run, grows the buffer
                positions = torch.arange(first, end)
                mask = torch.arange(end)[None, :] <= positions[:, None]
                pieces.append(layer.step(features[first:end], embeds[0, first:end], positions, cache, mask))
        got = torch.cat(pieces)
        assert len(cache) == n - 1
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= tolerance * scale, dtype


def test_a_draft_tree_expands_the_likeliest_paths_and_its_nodes_see_only_their_ancestors(tiny):
    path, head, records = tiny
    model = perturbed_model(path, head, seed=6, scale=0.3)  # attention that matters
    factory = FeatureDrafterFactory(model, head, dtype=torch.float32)
    r = records[4]
    history, features = r["tokens"][:14], r["features"][:13]
    n = len(history)
    drafter = factory()
    # Width 1 is the greedy chain.
    chain, _ = factory().draft_with_features(history, features, 4)
    line = drafter.draft_tree(history, features, depth=4, width=1, max_nodes=10)
    assert [node.token for node in line] == chain and [node.parent for node in line] == [-1, 0, 1, 2]
    tree = drafter.draft_tree(history, features, depth=4, width=3, max_nodes=40)
    assert len(tree) == 3 + 3 * 9 and len(drafter.cache) == n - 1  # 3 nodes expanded a depth; never kept
    assert drafter.draft_tree(history, features, depth=4, width=3, max_nodes=7) == tree[:7]
    assert tree[0].token == chain[0] and tree[0].parent == -1
    depth = []
    for i, node in enumerate(tree):
        assert node.parent < i  # parents come first
        depth.append(0 if node.parent < 0 else depth[node.parent] + 1)
        if node.parent >= 0:
            assert node.score <= tree[node.parent].score
    assert depth == sorted(depth) and max(depth) == 3
    # Each node's path probability: what the layer gives when it reads the node's path one row at a time
    # after the verified positions (the tree's batched rows must see their ancestors and nothing else).
    layer = factory.layer
    with torch.no_grad():
        for node in tree[3:]:
            path_tokens, at = [], node.parent
            while at >= 0:
                path_tokens.insert(0, tree[at].token)
                at = tree[at].parent
            reference = factory()
            guess = reference._read_verified(history, features)
            logp = 0.0
            for step, token in enumerate([*path_tokens, node.token]):
                scores = torch.log_softmax(layer.logits(guess)[0], -1)
                logp += float(scores[token])
                position = torch.tensor([n - 1 + step])
                guess = layer.step(guess, layer.embed([token]), position, reference.cache)
            assert math.log(node.score) == pytest.approx(logp, rel=1e-5, abs=1e-5), node
    # The drafter's cache after a tree: the next round drafts as a fresh drafter does.
    longer, more = r["tokens"][:16], r["features"][:15]
    assert drafter.draft_with_features(longer, more, 3) == factory().draft_with_features(longer, more, 3)


def test_select_tree_keeps_the_likeliest_nodes_with_their_ancestors():
    # (parent, token, log-probability of the path); node 3 ties its parent (probability 1 at that step).
    nodes = [(-1, 10, -0.1), (-1, 11, -1.0), (0, 12, -0.5), (0, 13, -0.1), (3, 14, -2.0), (1, 15, -1.2)]
    tree = select_tree(nodes, 4)
    assert [(n.parent, n.token) for n in tree] == [(-1, 10), (-1, 11), (0, 13), (0, 12)]
    assert tree[2].score == pytest.approx(math.exp(-0.1))
    assert [(n.parent, n.token) for n in select_tree(nodes, 2)] == [(-1, 10), (0, 13)]
    assert select_tree(nodes, 0) == []
