"""FlowCut: its score, cumulative update and adaptive count on crafted inputs, and the whole progressive pruning
inside the vision tower against a hand-written tower loop that follows the official algorithm one image at a time."""

import math

import pytest
import torch

import vlprune
from vlprune.selectors.flowcut import adaptive_prune, flowcut_scores

from reference import original_positions, state
from tiny import IMAGE, batch, pixels, prompt, tiny_llava

FEATURE = 5  # 7 CLIP layers, features from hidden_states[-2] = the output of encoder layer 5


def test_score_is_hand_computed():
    # one head, [CLS] + 2 patches; a zero [CLS] query attends uniformly
    query = torch.zeros(1, 1, 3, 2)
    key = torch.randn(1, 1, 3, 2)
    value = torch.tensor([[[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]]])
    attention, score = flowcut_scores(query, key, value, None, None)
    assert torch.allclose(attention, torch.tensor([[1 / 3, 1 / 3]]))
    e = math.e
    # softmax of the unscaled [CLS]-value products (1, 2, 0), [CLS] dropped, renormalised over the patches
    semantic = torch.tensor([e**2, 1.0]) / (e**2 + 1)
    expected = (torch.tensor([0.5, 0.5]) + semantic) * torch.tensor([2.0, 3.0])
    assert torch.allclose(score[0], expected)


def test_score_averages_values_over_heads_before_the_norm():
    # two heads whose values cancel partly: the density is ||mean over heads of v||_1, not the mean of the norms
    query = torch.zeros(1, 2, 2, 2)
    key = torch.zeros(1, 2, 2, 2)
    value = torch.tensor([[[[1.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, -2.0]]]])
    _, score = flowcut_scores(query, key, value, None, None)
    assert torch.allclose(score, torch.tensor([[(1.0 + 1.0) * 2.0]]))  # single patch: both terms normalise to 1
    # padding (valid=False) gets nothing and does not change the other tokens' normalisation
    value3 = torch.cat([value, torch.full((1, 2, 1, 2), 5.0)], 2)
    key3 = torch.zeros(1, 2, 3, 2)
    query3 = torch.zeros(1, 2, 3, 2)
    valid = torch.tensor([[True, True, False]])
    attention, padded = flowcut_scores(query3, key3, value3, valid, None)
    assert torch.allclose(attention, torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(padded[:, :1], score)


def test_cumulative_update_is_an_average_with_decay():
    selector = vlprune.create_selector("flowcut")
    state_, scores = {}, []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
        selector.observe(state_, q, k, v, None, None)
        scores.append(flowcut_scores(q, k, v, None, None)[1])
    assert torch.allclose(state_["score"], 0.25 * scores[0] + 0.25 * scores[1] + 0.5 * scores[2])


def test_adaptive_count_is_hand_computed():
    flat = torch.full((8,), 0.125)
    assert adaptive_prune(flat, 2, 2) == 0  # normalised entropy 1: nothing dropped
    two = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert adaptive_prune(two, 4, 1) == 1  # r = log 2 / log 4 = 1/2: 3 / 2 * 3/4 = 1.125
    two8 = torch.tensor([0.5, 0.5] + [0.0] * 6)
    assert adaptive_prune(two8, 2, 2) == 4  # r = 1/3: 6 / sqrt(2) * 8/9 = 3.77
    assert adaptive_prune(two8 * 7, 2, 2) == 4  # unnormalised attention: the same distribution
    peaked = torch.tensor([1.0] + [0.0] * 9)
    assert adaptive_prune(peaked, 4, 2) == 4  # r = 0: (10 - 2) / 2


def test_pruning_layers_count_back_from_the_feature_layer():
    selector = vlprune.create_selector("flowcut")
    assert selector.prune_after(22) == list(range(1, 22, 2))  # LLaVA-1.5: rpl = 22 - l - 1 even
    assert selector.prune_after(FEATURE) == [0, 2, 4]
    assert vlprune.create_selector("flowcut", every=3).prune_after(FEATURE) == [1, 4]


def test_prune_keeps_the_budget_at_the_last_layer_and_reindexes_the_scores():
    selector = vlprune.create_selector("flowcut")
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2], [0.3, 0.8, 0.1, 0.6, 0.0]])  # image 2 has 4 patches
    state_ = {"score": score.clone(), "cls_attention": torch.rand(2, 5)}
    keep = selector.prune(state_, FEATURE - 1, FEATURE, [5, 4], 2)  # remaining 0: exactly the budget
    assert [k.tolist() for k in keep] == [[1, 3], [1, 3]]
    assert torch.equal(state_["score"], torch.tensor([[0.9, 0.7], [0.8, 0.6]]))
    peaked = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]])
    state_ = {"score": score.clone(), "cls_attention": peaked}
    keep = selector.prune(state_, FEATURE - 5, FEATURE, [5, 4], 2)  # remaining 4, r = 0: drop (n - 2) / 2, rounded
    assert [k.tolist() for k in keep] == [[1, 2, 3], [0, 1, 3]]  # 5 - round(1.5) = 3; 4 - round(1.0) = 3
    assert adaptive_prune(torch.tensor([1.0, 0.0, 0.0]), 4, 2) == 0  # 0.5 rounds half to even


# --- end to end ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp():
    """7 CLIP layers whose queries and keys are scaled up, so [CLS] attention is peaked and the adaptive counts are
    not 0 (and differ between images)."""
    model = tiny_llava("eager", layers=3, vision_layers=7, seed=3)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return model


def reference_tower(model, pixel_values: torch.Tensor, keep: int):
    """FlowCut on one image with explicit attention weights: ``(kept patches, projected features, counts after each
    pruning layer)``."""
    tower = model.model.vision_tower
    h = tower.pre_layrnorm(tower.embeddings(pixel_values[None]))
    index = torch.arange(h.shape[1] - 1)
    cumulative, counts = None, []
    for i, layer in enumerate(tower.encoder.layers[: FEATURE + 1]):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        q, k, v = (
            p(x).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (1, H, T, T)
        out = (weights @ v).transpose(1, 2).reshape(1, -1, attn.embed_dim)
        h = h + attn.out_proj(out)
        h = h + layer.mlp(layer.layer_norm2(h))
        n = h.shape[1] - 1
        if n <= keep:
            continue
        a = weights[0, :, 0, 1:].mean(0)
        s = (v[0, :, :1] @ v[0].transpose(-1, -2)).softmax(-1)[:, 0].mean(0)[1:]
        density = v[0].mean(0)[1:].abs().sum(-1)
        score = (a / a.sum() + s / s.sum()) * density
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
        remaining = FEATURE - i - 1
        if remaining % 2:
            continue
        if remaining:
            p = a / a.sum()
            r = -(p * p.log()).sum() / math.log(n)
            drop = int(torch.round((n - keep) / remaining**0.5 * (1 - r**2)))
        else:
            drop = n
        chosen = torch.sort(torch.argsort(cumulative, descending=True, stable=True)[: max(n - drop, keep)]).values
        h = torch.cat([h[:, :1], h[:, 1 + chosen]], 1)
        cumulative, index = cumulative[chosen], index[chosen]
        counts.append(len(chosen))
    return index, model.model.multi_modal_projector(h[0, 1:]), counts


def test_tower_pruning_matches_the_reference_per_image(sharp):
    images = 3
    ids, mask = batch([prompt(sharp, 2, 3, images=2, seed=1), prompt(sharp, 4, 1, images=1, seed=2)])
    pv = pixels(images, seed=5)
    keep = 3
    with torch.no_grad():
        expected = [reference_tower(sharp, pv[i], keep) for i in range(images)]
    per_layer = [counts for _, _, counts in expected]
    assert len({tuple(c) for c in per_layer}) > 1, "the images should prune at different rates (ragged batch)"
    assert all(c[0] < 16 for c in per_layer), "the first pruning layer should drop tokens"

    seen = []
    with vlprune.wrap(sharp, "flowcut", keep=keep) as pruned, torch.no_grad():
        layers = sharp.model.vision_tower.encoder.layers
        probes = [
            layer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2]))) for layer in layers
        ]
        embeds = {}
        probes.append(
            sharp.model.language_model.register_forward_pre_hook(
                lambda m, a, kw: embeds.update(x=kw["inputs_embeds"]), with_kwargs=True
            )
        )
        sharp(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=original_positions(mask))
        for probe in probes:
            probe.remove()
        plan = pruned.plans[0]
    # later vision layers ran on fewer tokens: [CLS] + the longest image's patches after each pruning layer (0, 2, 4)
    longest = [1 + max(c[j] for c in per_layer) for j in range(3)]
    assert [length for _, length in seen] == [17, longest[0], longest[0], longest[1], longest[1], 1 + keep, 1 + keep]
    image = 0
    for b in range(2):
        visual = torch.nonzero(ids[b] == IMAGE).flatten()
        for j in range(int(plan.num_visual[b] // 16)):
            index, features, _ = expected[image]
            kept = plan.keep_visual[b][plan.image_of[b] == j] - 16 * j
            assert torch.equal(kept, index)
            torch.testing.assert_close(embeds["x"][b, visual[16 * j + index]], features, rtol=1e-4, atol=1e-5)
            image += 1


def test_errors_and_unwrap(sharp):
    siglip = tiny_llava("sdpa", vision="siglip")
    before = state(siglip)
    with pytest.raises(ValueError, match=r"'flowcut' prunes inside the vision tower and needs a vision tower with"):
        vlprune.wrap(siglip, "flowcut", keep=4)
    assert state(siglip) == before
    with pytest.raises(ValueError, match="acts inside the vision tower: it must be the first stage, at layer 0"):
        vlprune.wrap(sharp, "flowcut", keep=4, layer=2)
    config = vlprune.PruneConfig([vlprune.Stage("flowcut", keep=8), vlprune.Stage("fastervlm", keep=4, layer=2)])
    with pytest.raises(ValueError, match="reads \\['cls_attention'\\] from inside the vision tower"):
        vlprune.wrap(sharp, config)
    with pytest.raises(ValueError, match="decay must be a number in"):
        vlprune.create_selector("flowcut", decay=1.0)


def test_a_later_llm_stage_after_flowcut(sharp):
    ids, mask = batch([prompt(sharp, 2, 3, images=1, seed=1)])
    pv = pixels(1, seed=5)
    config = vlprune.PruneConfig([vlprune.Stage("flowcut", keep=8), vlprune.Stage("divprune", keep=4, layer=1)])
    with vlprune.wrap(sharp, config) as pruned, torch.no_grad():
        sharp(input_ids=ids, attention_mask=mask, pixel_values=pv)
    first, second = pruned.plans
    assert first.kept_per_sample == [8] and second.kept_per_sample == [4]
    assert set(second.keep_visual[0].tolist()) <= set(first.keep_visual[0].tolist())
